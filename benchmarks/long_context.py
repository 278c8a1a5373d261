"""Long prompts through the Engine: chunked prefill over the paged cache, then decoding at that
context, against the HBM roofline.

    python benchmarks/long_context.py --shape llama3.1-8b --cases 1x16384 1x32768 1x131072 8x8192

Each case BxN runs B prompts of N random tokens (random bf16 weights) with max_tokens 1 + --decode;
prefill tokens/s is B*N over the time to the last first token, and decode ms/token the time
from there to the end over --decode steps. The roofline is the weight bytes plus the live KV
bytes one decode step reads, over the bandwidth measured in the same run. A short warm-up case
per batch size compiles the programs first (the cases of a batch size share one engine and its
programs). Prints a table.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import KV_CACHE_DTYPES, SHAPES, kv_bytes_per_token, memory_bandwidth, random_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama3.1-8b", help=f"{'|'.join(SHAPES)} or a config.json path")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--cases", nargs="+", default=["1x16384", "1x32768", "1x131072", "8x8192"])
    p.add_argument("--decode", type=int, default=128, help="tokens decoded after the prompt")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--memory-fraction", type=float, default=0.9)
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def engine_for(model, batch: int, max_len: int, args):
    from jaxtp import engine
    return engine.Engine(model, batch, max_len, 16, args.max_num_batched_tokens, args.page_size)


def run_case(eng, batch: int, n: int, args) -> dict:
    import numpy as np
    from jaxtp import engine
    from jaxtp.engine.sampling import SamplingParams
    params = SamplingParams(max_tokens=1 + args.decode, temperature=0.0, ignore_eos=True)
    rng = np.random.default_rng(n)
    vocab = eng.runner.model.config.vocab_size
    seqs = [engine.Sequence(rng.integers(0, vocab, n).tolist(), params, 0) for _ in range(batch)]
    t0 = time.perf_counter()
    for s in seqs:
        eng.add(s)
    first = None
    while eng.has_unfinished:
        eng.step()
        if first is None and all(s.tokens for s in seqs):
            first = time.perf_counter()
    end = time.perf_counter()
    return dict(batch=batch, prompt=n, prefill_s=first - t0, prefill_tokens_per_s=batch * n / (first - t0),
                decode_ms=(end - first) * 1e3 / args.decode)


def main(argv=None):
    args = parse_args(argv)
    import jax
    model = random_model(args.shape, args.tp, memory_fraction=args.memory_fraction,
                         kv_cache_dtype=args.kv_cache_dtype)
    weights = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(model.params))
    kv_per_token = kv_bytes_per_token(model)
    bandwidth = max(memory_bandwidth(jax.devices()[0]).values())
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: {args.shape} tp={args.tp}, "
          f"{weights / 1e9:.2f} GB of weights per device, {bandwidth / 1e12:.2f} TB/s", flush=True)
    cases = [tuple(map(int, c.split("x"))) for c in args.cases]
    max_len = max(n for _, n in cases) + 1 + args.decode
    rows = []
    for batch in dict.fromkeys(b for b, _ in cases):  # one engine per batch size, warmed up first
        eng = engine_for(model, batch, max_len, args)
        run_case(eng, batch, args.max_num_batched_tokens, args)
        for b, n in cases:
            if b == batch:
                r = run_case(eng, batch, n, args)
                r["roofline"] = (weights + batch * (n + args.decode / 2) * kv_per_token) / bandwidth * 1e3 / r["decode_ms"]
                rows.append(r)
                print(json.dumps(r), flush=True)
        del eng
    print("\n| prompts | prefill s | prefill tok/s | decode ms/token | decode roofline |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['batch']} x {r['prompt']} | {r['prefill_s']:.2f} | {r['prefill_tokens_per_s']:.0f} | "
              f"{r['decode_ms']:.3f} | {r['roofline']:.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
