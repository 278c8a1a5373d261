"""Offline throughput, shaped like vLLM's benchmark_throughput: N requests with given prompt and
output lengths (ignore_eos) through the Engine at once; requests/s, output and total tokens/s.

    python benchmarks/throughput.py --shape llama2-7b --num-prompts 1000 [--dataset sharegpt.json]

Lengths come from a local ShareGPT-format JSON (the first human turn is the prompt, the first
reply the output; lengths by whitespace words x 1.3 when there is no tokenizer), or else from
synthetic log-normal distributions with a fixed seed, clipped to [--min-len, --max-*-len]
(medians 188 / 149 tokens by default, as ShareGPT's are). Random weights on device; prompts are
random token ids. Each pass first warms the engine up (Engine.warmup compiles its programs; the
first pass's warm-up is the compile time, from jax's own compile-time events); the second pass
is the measurement. Prints a table, optionally --json.
"""
import argparse
import collections
import contextlib
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import KV_CACHE_DTYPES, SHAPES, decode_config, random_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama2-7b", help=f"{'|'.join(SHAPES)} or a config.json path")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--dataset", help="a ShareGPT-format JSON file (default: synthetic lengths)")
    p.add_argument("--prompt-median", type=int, default=188)
    p.add_argument("--output-median", type=int, default=149)
    p.add_argument("--max-prompt-len", type=int, default=2048)
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--min-len", type=int, default=4)
    p.add_argument("--sigma", type=float, default=0.9, help="log-normal spread of the synthetic lengths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--chunk", type=int, default=16, help="decode steps per engine step")
    p.add_argument("--memory-fraction", type=float, default=0.9)
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    p.add_argument("--decode-kernel", type=decode_config, default=decode_config("default"), metavar="FIELD=N,...",
                   help="the decode kernel's tiling (benchmark.py --decode-kernel)")
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--no-warmup", action="store_true", help="compile on first use, inside the pass")
    p.add_argument("--warmup-threads", type=int, default=None,
                   help="XLA compiles at once during warm-up (default: one per CPU core)")
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--trace", help="profile engine steps --trace-steps of the last pass into this directory and "
                   "print a per-kernel summary (trace_summary.py)")
    p.add_argument("--trace-steps", type=int, nargs=2, default=(20, 24), metavar=("FIRST", "END"))
    p.add_argument("--call-times", action="store_true",
                   help="one more pass that waits for every device call: seconds of prefill and of decode, and "
                        "ms per decode step by rows run")
    return p.parse_args(argv)


def lengths(args) -> list[tuple[int, int]]:
    import numpy as np
    if args.dataset:
        pairs = []
        for conv in json.loads(Path(args.dataset).read_text()):
            turns = conv.get("conversations", [])
            if len(turns) >= 2:
                pairs.append(tuple(max(args.min_len, int(len(t["value"].split()) * 1.3)) for t in turns[:2]))
        pairs = [(min(p, args.max_prompt_len), min(o, args.max_output_len)) for p, o in pairs]
        return pairs[:args.num_prompts]
    rng = np.random.default_rng(args.seed)

    def draw(median, most):
        x = rng.lognormal(np.log(median), args.sigma, args.num_prompts)
        return np.clip(x.round(), args.min_len, most).astype(int).tolist()
    return list(zip(draw(args.prompt_median, args.max_prompt_len), draw(args.output_median, args.max_output_len)))


class Calls(collections.Counter):
    """What the engine asked of the device: calls by kind and shape, prefill tokens real and
    padded, decode rows live and run, and the host's seconds waiting for results; where each
    call is waited for (timed), the device seconds of each kind and of decode by rows run."""


def watch(runner, timed: bool = False) -> Calls:
    calls, prefill, decode, read = Calls(), runner.prefill, runner.decode, runner.read

    def wait(p, key):  # the device runs calls in order: the one before this is done already
        if timed:
            t0 = time.perf_counter()
            p.step.tokens.block_until_ready()
            calls[key] += time.perf_counter() - t0
        return p

    def on_prefill(chunks):
        size, rows = runner.prefill_shape(chunks)
        p = prefill(chunks)
        calls[f"prefill {size} tokens x{rows} rows"] += 1
        calls["prefill tokens"] += sum(c.length for c in chunks)
        calls["prefill padded"] += size * runner.model.mesh.shape["dp"]
        return wait(p, "prefill s")

    def on_decode(columns, steps):
        p = decode(columns, steps)
        calls["decode calls"] += 1
        calls["decode rows live"] += sum(c is not None for c in columns)
        calls["decode rows run"] += len(p.seqs)
        calls[f"decode steps x{len(p.seqs)}"] += steps
        calls[f"decode context x{len(p.seqs)}"] += steps * sum(len(c.prompt) + len(c.tokens) + steps / 2
                                                               for c in columns if c is not None)
        return wait(p, f"decode s x{len(p.seqs)}")

    def on_read(pending):
        t0 = time.perf_counter()
        out = read(pending)
        calls["read wait s"] += time.perf_counter() - t0
        return out
    runner.prefill, runner.decode, runner.read = on_prefill, on_decode, on_read
    return calls


@contextlib.contextmanager
def profiled(args, step: int, trace: bool):
    first, end = args.trace_steps
    if not (trace and args.trace and first <= step < end):
        yield
        return
    import jax
    if step == first:
        jax.profiler.start_trace(args.trace)
    yield
    if step == end - 1:
        jax.profiler.stop_trace()
        import trace_summary
        trace_summary.summarize(args.trace, end - first)


def one_pass(model, pairs, args, vocab: int, seed: int, compiled: list, trace: bool = False,
             timed: bool = False) -> dict:
    import numpy as np
    from jaxtp import engine
    from jaxtp.engine.sampling import SamplingParams
    gc.collect()  # the last pass's engine (its KV pool) must be gone before this one's is made
    rng = np.random.default_rng(seed)
    max_len = max(p + o for p, o in pairs)
    eng = engine.Engine(model, args.max_num_seqs, max_len, args.chunk, args.max_num_batched_tokens,
                        args.page_size)
    seqs = [engine.Sequence(rng.integers(0, vocab, p).tolist(), SamplingParams(max_tokens=o, temperature=0.0,
                                                                               ignore_eos=True), 0)
            for p, o in pairs]
    warm, before = time.perf_counter(), sum(compiled)
    if not args.no_warmup:
        eng.warmup(lambda i, n, what: print(f"   warmup {i}/{n}: {what} at {time.perf_counter() - warm:.1f} s",
                                            flush=True), every_variant=False,  # greedy, no log-probs
                   threads=args.warmup_threads)
    warm, warm_compile = time.perf_counter() - warm, sum(compiled) - before
    for s in seqs:
        eng.add(s)
    calls = watch(eng.runner, timed)
    before = sum(compiled)
    peak, steps, t0 = 0, 0, time.perf_counter()
    while eng.has_unfinished:
        with profiled(args, steps, trace):
            eng.step()
        peak, steps = max(peak, eng.num_running), steps + 1
    elapsed = time.perf_counter() - t0
    compile_s = sum(compiled) - before
    out = sum(len(s.tokens) for s in seqs)
    assert out == sum(o for _, o in pairs), "every request must get all its tokens"
    total = out + sum(p for p, _ in pairs)
    return dict(elapsed_s=elapsed, requests_per_s=len(seqs) / elapsed, output_tokens_per_s=out / elapsed,
                total_tokens_per_s=total / elapsed, peak_running=peak, preemptions=eng.preemptions,
                kv_pages=eng.blocks.capacity, page_size=eng.blocks.page_size, engine_steps=steps,
                warmup_s=warm, warmup_compile_s=warm_compile, compile_s=compile_s,
                calls=dict(calls))


def print_call_times(model, r: dict) -> None:
    """The timed pass: where the device's time went, and each decode bucket's step against the
    bytes it must read (the weights, and the live rows' keys and values) at the measured
    bandwidth."""
    import jax
    from benchmark import kv_bytes_per_token, memory_bandwidth, weight_bytes
    calls = r["calls"]
    bandwidth = max(memory_bandwidth(jax.devices()[0]).values())
    weights, per_token = weight_bytes(model.params), kv_bytes_per_token(model)
    decode = {int(k.split("x")[-1]): v for k, v in calls.items() if k.startswith("decode s x")}
    print(f"\ntimed pass ({r['elapsed_s']:.1f} s): prefill {calls.get('prefill s', 0):.2f} s for "
          f"{calls['prefill tokens']:.0f} tokens ({calls['prefill padded']:.0f} carried), decode {sum(decode.values()):.2f} s "
          f"(roofline at {bandwidth / 1e12:.2f} TB/s)")
    print("| decode rows run | steps | s | ms/step | context tokens / step | roofline ms | roofline |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for n, secs in sorted(decode.items()):
        steps, context = calls[f"decode steps x{n}"], calls[f"decode context x{n}"]
        ms, roof = secs / steps * 1e3, (weights + context / steps * per_token) / bandwidth * 1e3
        print(f"| {n} | {steps} | {secs:.2f} | {ms:.2f} | {context / steps:.0f} | {roof:.2f} | {roof / ms:.0%} |")


def main(argv=None):
    args = parse_args(argv)
    import jax
    compiled = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiled.append(secs) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    model = random_model(args.shape, args.tp, memory_fraction=args.memory_fraction,
                         kv_cache_dtype=args.kv_cache_dtype, decode=args.decode_kernel[1])
    pairs = lengths(args)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: {args.shape} tp={args.tp}, {len(pairs)} requests, "
          f"prompt median {statistics.median(p for p, _ in pairs)} / max {max(p for p, _ in pairs)}, output median "
          f"{statistics.median(o for _, o in pairs)} / max {max(o for _, o in pairs)}", flush=True)
    runs = []
    for i in range(args.passes):
        r = one_pass(model, pairs, args, model.config.vocab_size, args.seed + i, compiled, trace=i == args.passes - 1)
        runs.append(r)
        print(f"pass {i + 1}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in r.items() if k != "calls"), flush=True)
        print("   " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(r["calls"].items())), flush=True)
    last = runs[-1]
    if args.call_times:
        print_call_times(model, one_pass(model, pairs, args, model.config.vocab_size, args.seed, compiled, timed=True))
    print("\n| pass | s | req/s | output tok/s | total tok/s | peak running | preemptions | warm-up s (compile) "
          "| compile s in the pass |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for i, r in enumerate(runs):
        print(f"| {i + 1} | {r['elapsed_s']:.1f} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.0f} | "
              f"{r['total_tokens_per_s']:.0f} | {r['peak_running']} | {r['preemptions']} | {r['warmup_s']:.1f} "
              f"({r['warmup_compile_s']:.1f}) | {r['compile_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), passes=runs, result=last), indent=1))


if __name__ == "__main__":
    main()
