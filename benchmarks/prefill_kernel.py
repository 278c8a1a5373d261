"""Time the prefill attention kernel (jaxtp/ops/kernels/prefill_attention.py) alone: one chunk
of --chunk queries at the end of a context of each --context length, Llama-3-8B heads (32 query
/ 8 KV, head_dim 128) in bf16 pages, for each config. TFLOP/s count the causal work only.

    python benchmarks/prefill_kernel.py --context 8192 131072 --configs 128,1,8,3 64,2,4,3
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxtp.ops.kernels import prefill_attention  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--configs", nargs="+", default=["128,1,8,3"], help="block_q,pages,warps,stages")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    heads, kvh, d, size = 32, 8, 128, 64
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    print(f"{'context':>8s} {'config':>12s} {'ms':>8s} {'TFLOP/s':>8s}")
    for s in args.context:
        t, start, width = args.chunk, s - args.chunk, s // size
        q = jax.random.normal(jax.random.key(0), (1, t, heads, d), jnp.bfloat16)
        pages = jax.random.normal(jax.random.key(1), (width + 1, kvh, size, d), jnp.bfloat16)
        v_pages = pages.swapaxes(2, 3)  # values keep positions last (engine.kv_cache)
        table = jnp.asarray(np.random.default_rng(0).permutation(width)[None] + 1, jnp.int32)
        starts = jnp.array([start], jnp.int32)
        flops = 4 * heads * d * (t * start + t * (t + 1) / 2)
        for spec in args.configs:
            bq, pg, warps, stages = map(int, spec.split(","))
            cfg = prefill_attention.Config(block_q=bq, pages=pg, warps=warps, stages=stages)
            f = jax.jit(lambda *a, cfg=cfg: prefill_attention.attend(*a, config=cfg))
            f(q, pages, v_pages, table, starts).block_until_ready()
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                f(q, pages, v_pages, table, starts).block_until_ready()
                times.append(time.perf_counter() - t0)
            ms = float(np.median(times)) * 1e3
            print(f"{s:8d} {spec:>12s} {ms:8.2f} {flops / ms / 1e9:8.0f}", flush=True)


if __name__ == "__main__":
    main()
