"""Generate text with jaxtp: `python scripts/generate.py --tp 2 --prompt "17+25="`.

With no --model it runs the embedded default checkpoint (checkpoints/tiny-arith, a tiny Llama
trained to add numbers). On a machine without accelerators, --tp N runs on N simulated CPU devices.
--dp N adds data-parallel replicas (they split the batch), --pp N pipeline stages (they split the
layers). Multi-host: run the same command on every host with --coordinator HOST:PORT
--num-processes N --process-id I (or JAXTP_COORDINATOR / JAXTP_NUM_PROCESSES / JAXTP_PROCESS_ID);
the mesh then spans all processes' devices and process 0 prints.
Every vLLM SamplingParams field is a flag; --stream prints text as it is generated, --chat wraps
each prompt in the tokenizer's chat template, --prompts-file reads one prompt per line.
"""
import argparse
import os
import sys
import time

import model_options

DEFAULT_PROMPTS = ["17+25=", "408+199=", "3+999=", "250+250="]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_options.add(p)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (devices)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas (split the batch)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (split the layers)")
    d = p.add_argument_group("multi-process (jax.distributed)")
    d.add_argument("--coordinator", help="HOST:PORT of process 0 (default: $JAXTP_COORDINATOR)")
    d.add_argument("--num-processes", type=int, help="default: $JAXTP_NUM_PROCESSES")
    d.add_argument("--process-id", type=int, help="default: $JAXTP_PROCESS_ID")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--prompts-file", help="a file with one prompt per line ('-': stdin)")
    p.add_argument("--chat", action="store_true", help="apply the chat template (prompt = user turn)")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    s = p.add_argument_group("sampling (vLLM SamplingParams)")
    s.add_argument("--n", type=int, default=1, help="samples per prompt")
    s.add_argument("--max-tokens", type=int, default=32)
    s.add_argument("--min-tokens", type=int, default=0)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    s.add_argument("--stop-token-ids", type=int, nargs="+", default=[])
    s.add_argument("--include-stop-str-in-output", action="store_true")
    s.add_argument("--ignore-eos", action="store_true")
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("--logprobs", type=int, default=None, help="top log-probs per generated token")
    s.add_argument("--prompt-logprobs", type=int, default=None, help="top log-probs per prompt token")
    return p.parse_args(argv)


SAMPLING_FLAGS = ["n", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                  "stop", "stop_token_ids", "include_stop_str_in_output", "ignore_eos",
                  "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs",
                  "prompt_logprobs"]


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        f = sys.stdin if args.prompts_file == "-" else open(args.prompts_file, encoding="utf-8")
        with f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    return prompts or DEFAULT_PROMPTS


def show_logprobs(out) -> str:
    if out.logprobs is None:
        return ""
    steps = [f"{e[t].decoded_token!r}:{e[t].logprob:.3f}" for t, e in zip(out.token_ids, out.logprobs)]
    return f"\n    logprobs {' '.join(steps)} (cumulative {out.cumulative_logprob:.3f})"


def main(argv=None):
    args = parse_args(argv)
    procs = args.num_processes or int(os.environ.get("JAXTP_NUM_PROCESSES") or
                                      os.environ.get("JAX_NUM_PROCESSES") or 1)
    devices = max(args.tp * args.dp * args.pp // max(procs, 1), 1)  # per process
    # Must precede the first jax import; it only affects the CPU platform.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={devices}").strip()
    from jaxtp import distributed
    try:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:
        sys.exit(f"error: {e}")
    import jax
    import jaxtp

    if jax.process_index() > 0:  # every process runs the same program; one prints
        sys.stdout = open(os.devnull, "w")
    try:
        params = jaxtp.SamplingParams(**{k: getattr(args, k) for k in SAMPLING_FLAGS})
        prompts = read_prompts(args)
        model = jaxtp.load(args.model, tp=args.tp, dp=args.dp, pp=args.pp,
                           **model_options.load_kwargs(args))
        if args.chat:
            system = [{"role": "system", "content": args.system}] if args.system else []
            inputs = [jaxtp.chat_prompt(model, system + [{"role": "user", "content": p}]) for p in prompts]
        else:
            inputs = prompts
        start = time.perf_counter()
        if args.stream:
            outs = stream(jaxtp, model, prompts, inputs, params)
        else:
            outs = jaxtp.generate(model, inputs, params)
            for prompt, out in zip([p for p in prompts for _ in range(params.n)], outs):
                tag = f"[{out.index}] " if params.n > 1 else ""
                print(f"{tag}{prompt!r} -> {out.text!r} ({out.finish_reason}){show_logprobs(out)}")
        elapsed = time.perf_counter() - start
    except (ValueError, TypeError, KeyError, OSError) as e:
        sys.exit(f"error: {e}")
    n = sum(len(o.token_ids) for o in outs)
    devices = model.mesh.devices.flatten()
    print(f"{len(prompts)} prompts, {n} tokens in {elapsed:.2f}s ({n / elapsed:.1f} tok/s incl. "
          f"compilation), tp={model.tp}, devices={len(devices)}x {devices[0].platform} "
          f"({jax.devices()[0].device_kind}), dp={model.dp}, pp={model.pp}, processes={jax.process_count()}, "
          f"all-reduce={model.ops.all_reduce}, kernels={model.ops.kernels}")


def stream(jaxtp, model, prompts, inputs, params):
    """Print each sample's text as it arrives: one prompt at a time when there is one sample,
    else tagged lines per delta. Returns the finished completions."""
    outs = {}
    tagged = len(prompts) * params.n > 1
    for d in jaxtp.stream(model, inputs, params):
        if tagged:
            if d.text:
                print(f"[{d.request.request_id}.{d.index}] {d.text!r}", flush=True)
        else:
            print(d.text, end="", flush=True)
        if d.finish_reason:
            outs[(d.request.request_id, d.index)] = d.request.output().outputs[d.index]
            if not tagged:
                print(f"  ({d.finish_reason})")
    return list(outs.values())


if __name__ == "__main__":
    main()
