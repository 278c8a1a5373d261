"""bf16 projections at decode batch sizes (the rows of a busy server's decode step), as TFLOP/s:
XLA's own autotuned GEMM (cuBLAS or Triton, as the model runs it) against JAX's Hopper
warp-specialized matmul (`pallas.ops.gpu.hopper_matmul_mgpu`) over a small grid of tilings.
Each timing runs enough distinct weights back to back that they cannot sit in L2. XLA flags
(e.g. `--xla_gpu_enable_cublaslt=true`) are A/B'd by running this script under each XLA_FLAGS.

    python benchmarks/gemm.py [--shape llama2-7b] [--rows 128 256] [--pallas]
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from quant_matmul import PASSES, SHAPES, over_copies, timed  # noqa: E402

GRID = dict(tile_m=(64, 128), tile_n=(64, 128, 256), wg_dimension=("M", "N"), grid_tile_width=(1, 8))


def hopper(config: dict):
    """JAX's Hopper matmul with one tiling (None where the shape does not divide it)."""
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
    dims = {k: hm.MatmulDimension[v] for k, v in config.items() if k in ("wg_dimension", "grid_minor_dim")}
    cfg = hm.TuningConfig(tile_k=64, max_concurrent_steps=4, epi_tile_m=64, epi_tile_n=64,
                          **{**config, **dims})
    return lambda x, w, s: hm.matmul(x, w, None, cfg)


def xla(x, w, s):
    return jnp.einsum("mk,kn->mn", x, w)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama2-7b", choices=SHAPES)
    p.add_argument("--rows", type=int, nargs="+", default=[128, 256])
    p.add_argument("--pallas", action="store_true", help="also time JAX's Hopper matmul")
    args = p.parse_args(argv)
    table = []
    for (name, (k, n)), m in itertools.product(SHAPES[args.shape].items(), args.rows):
        copies = min(16, max(2, -(-512 * 2 ** 20 // (2 * k * n))))
        ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) for i in range(copies)]
        ss = [None] * copies
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
        flops = 2 * m * k * n * copies / 1e12
        row = [name, m, k, n, flops / timed(over_copies(xla), x, ws, ss)]
        best = (0.0, "-")
        for values in itertools.product(*GRID.values()) if args.pallas else ():
            config = dict(zip(GRID, values))
            try:
                fn = hopper(config)
                got = np.asarray(jax.jit(fn)(x, ws[0], None), np.float32)
                want = np.asarray(xla(x, ws[0], None), np.float32)
                assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max(), "wrong result"
                rate = flops / timed(over_copies(fn), x, ws, ss)
            except Exception as e:  # a tiling the shape or shared memory does not allow
                # (only the type: formatting some Mosaic errors printed MLIR and crashed the process)
                print(f"  {name} m={m} {config}: {type(e).__name__}", flush=True)
                continue
            best = max(best, (rate, str(config)))
        table.append(row + list(best))
        print(table[-1], flush=True)
    print(f"\nPASSES={PASSES}, TFLOP/s; XLA_FLAGS={__import__('os').environ.get('XLA_FLAGS', '')}")
    print(f"{'proj':>8} {'rows':>5} {'K':>6} {'N':>6} {'XLA':>6} {'hopper':>7}  best tiling")
    for name, m, k, n, a, b, cfg in table:
        print(f"{name:>8} {m:>5} {k:>6} {n:>6} {a:>6.0f} {b:>7.0f}  {cfg}")


if __name__ == "__main__":
    main()
