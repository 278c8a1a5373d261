"""Automatic prefix caching on and off, through the Engine (random weights, random token ids):

    python benchmarks/prefix_cache.py --shape llama3-8b

shared: --requests requests share a --system-tokens prompt and each adds --suffix-tokens of its
own; the first is sent alone, the rest together once it is done. Reports their median time to
first token and the prefill tokens computed (prompt tokens less the cache's hits).
chat: --conversations conversations of --turns turns; each turn sends the whole history (the
earlier turns' messages and replies) plus a new --message-tokens message and generates --reply
tokens; the conversations' turns go together. Reports tokens (prompt + output) per second.
Each case runs once untimed first (compiling), then timed. Prints a table.
"""
import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import SHAPES, random_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama3-8b", help=f"{'|'.join(SHAPES)} or a config.json path")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--system-tokens", type=int, default=4096)
    p.add_argument("--suffix-tokens", type=int, default=64)
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--message-tokens", type=int, default=512)
    p.add_argument("--reply", type=int, default=32)
    p.add_argument("--memory-fraction", type=float, default=0.9)
    return p.parse_args(argv)


def finish(eng, seqs) -> dict[int, float]:
    """Step until `seqs` are done -> seconds from now to each one's first token, by id."""
    first, t0 = {}, time.perf_counter()
    for s in seqs:
        eng.add(s)
    while eng.has_unfinished:
        eng.step()
        for s in seqs:
            if s.tokens and id(s) not in first:
                first[id(s)] = time.perf_counter() - t0
    return first


def shared(model, args, caching: bool, rng) -> dict:
    from jaxtp import engine
    from jaxtp.engine.sampling import SamplingParams
    vocab, params = model.config.vocab_size, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    system = rng.integers(0, vocab, args.system_tokens).tolist()
    seqs = [engine.Sequence(system + rng.integers(0, vocab, args.suffix_tokens).tolist(), params, 0)
            for _ in range(args.requests)]
    eng = engine.Engine(model, args.requests, args.system_tokens + args.suffix_tokens + 1,
                        enable_prefix_caching=caching)
    finish(eng, seqs[:1])
    ttft = finish(eng, seqs[1:])
    return dict(ttft_ms=1e3 * statistics.median(ttft.values()),
                computed=eng.prefix_queries - eng.prefix_hits, hits=eng.prefix_hits)


def chat(model, args, caching: bool, rng) -> dict:
    from jaxtp import engine
    from jaxtp.engine.sampling import SamplingParams
    vocab, params = model.config.vocab_size, SamplingParams(max_tokens=args.reply, temperature=0.0, ignore_eos=True)
    longest = args.turns * (args.message_tokens + args.reply)
    eng = engine.Engine(model, args.conversations, longest, enable_prefix_caching=caching)
    history = [[] for _ in range(args.conversations)]
    tokens, t0 = 0, time.perf_counter()
    for _ in range(args.turns):
        seqs = [engine.Sequence(h + rng.integers(0, vocab, args.message_tokens).tolist(), params, 0) for h in history]
        finish(eng, seqs)
        history = [s.prompt + s.tokens for s in seqs]
        tokens += sum(len(s.prompt) + len(s.tokens) for s in seqs)
    elapsed = time.perf_counter() - t0
    return dict(seconds=elapsed, tokens_per_s=tokens / elapsed, computed=eng.prefix_queries - eng.prefix_hits,
                hits=eng.prefix_hits)


def main(argv=None):
    args = parse_args(argv)
    import jax
    import numpy as np
    model = random_model(args.shape, args.tp, memory_fraction=args.memory_fraction)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: {args.shape} tp={args.tp}", flush=True)
    rows = []
    for name, case in (("shared", shared), ("chat", chat)):
        for caching in (False, True):
            gc.collect()  # the last engine's KV pool goes before the next is made
            case(model, args, caching, np.random.default_rng(1))  # compiles
            r = case(model, args, caching, np.random.default_rng(0))
            print(f"{name} caching={caching}: {r}", flush=True)
            rows.append((name, caching, r))
    by = {(n, c): r for n, c, r in rows}
    print("\n| case | caching | TTFT of requests 2.. ms | tokens/s | prefill tokens computed | cache hits | on / off |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, caching, r in rows:
        off = by[(name, False)]
        gain = off["ttft_ms"] / r["ttft_ms"] if name == "shared" else r["tokens_per_s"] / off["tokens_per_s"]
        print(f"| {name} | {'on' if caching else 'off'} | {r.get('ttft_ms', float('nan')):.1f} | "
              f"{r.get('tokens_per_s', float('nan')):.0f} | {r['computed']} | {r['hits']} | {gain:.1f}x |")


if __name__ == "__main__":
    main()
