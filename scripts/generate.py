"""Generate text with jaxtp: `python scripts/generate.py --tp 2 --prompt "17+25="`.

With no --model it runs the embedded default checkpoint (checkpoints/tiny-arith, a tiny Llama
trained to add numbers). On a machine without accelerators, --tp N runs on N simulated CPU devices.
"""
import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-arith"
DEFAULT_PROMPTS = ["17+25=", "408+199=", "3+999=", "250+250="]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="HF model directory or hub id")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (devices)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Must precede the first jax import; it only affects the CPU platform.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={max(args.tp, 1)}").strip()
    import jax
    import jaxtp

    try:
        params = jaxtp.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                      top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        model = jaxtp.load(args.model, tp=args.tp, dtype=args.dtype)
        prompts = args.prompt or DEFAULT_PROMPTS
        start = time.perf_counter()
        outs = jaxtp.generate(model, prompts, params)
        elapsed = time.perf_counter() - start
    except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    for out in outs:
        print(f"{out.prompt!r} -> {out.text!r} ({out.finish_reason})")
    n = sum(len(o.token_ids) for o in outs)
    devices = model.mesh.devices.flatten()
    print(f"{n} tokens in {elapsed:.2f}s ({n / elapsed:.1f} tok/s incl. compilation), tp={model.tp}, "
          f"devices={len(devices)}x {devices[0].platform} ({jax.devices()[0].device_kind})")


if __name__ == "__main__":
    main()
