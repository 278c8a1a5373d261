"""The 8-bit decode matmul (jaxtp/ops/kernels/quant_matmul.py, Mosaic GPU, weight [N, K]) on a
GPU at real projection shapes: checked against a float32 product, then timed for each kernel
configuration in a small grid and against XLA's convert-and-GEMM, as weight GB/s (the 8-bit
bytes a product must read). `--kernel jax` times JAX's own Hopper mixed-type matmul instead.
Each timing runs enough distinct weights back to back that they cannot sit in L2.

    python benchmarks/quant_matmul.py [--shape llama2-7b] [--rows 2 32] [--dtype int8 fp8] [--kernel jaxtp]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxtp import model  # noqa: E402
from jaxtp.ops.kernels import quant_matmul  # noqa: E402

SHAPES = {  # (K, N) of qkv, o, gate|up, down
    "tiny": {"o": (256, 256)},  # a smoke test off GPUs
    "llama2-7b": {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)},
    "llama3-8b": {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)},
}
class JaxMixed:
    """JAX's own Hopper mixed-type matmul (warp-specialized, persistent, no split of K), with
    the weight [N, K] as its int8 LHS and the activations transposed as its RHS."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        tile_k: int = 128
        stages: int = 4

    @staticmethod
    def matmul(x, weight_t, scale, out_dtype=None, config=Config()):
        from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mixed
        rows = max(16, quant_matmul.rows_for(x.shape[0]))  # its RHS swizzle needs 32 bytes
        xt = jnp.pad(x, ((0, rows - x.shape[0]), (0, 0))).T
        cfg = mixed.TuningConfig(tile_m=64, tile_n=rows, tile_k=config.tile_k, max_concurrent_steps=config.stages,
                                 epi_tile_n=None, epi_tile_m=64, wg_dimension=mixed.MatmulDimension.M)
        y = mixed.mixed_matmul_kernel(weight_t, xt, out_dtype=jnp.float32, config=cfg)
        return (y.T[:x.shape[0]] * scale).astype(out_dtype or x.dtype)


GRIDS = {  # kernel -> (module, config grid)
    "jaxtp": (quant_matmul, dict(block_n=(64,), block_k=(128, 256), programs=(264, 528, 1056), stages=(4, 8))),
    "jax": (JaxMixed, dict(tile_k=(64, 128), stages=(4, 6))),
}
PASSES = 20  # passes over the weights per timed program
DTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}


def weights(k: int, n: int, dtype, copies: int, seed: int = 0):
    """`copies` separate weight buffers (a list: slicing a stacked array would copy it) and scales."""
    ws, ss = [], []
    for i in range(copies):
        w = jax.random.normal(jax.random.key(seed + i), (k, n), jnp.float32) * 30
        w = jnp.clip(jnp.round(w), -127, 127) if dtype == jnp.int8 else jnp.clip(w / 30, -448, 448)
        ws.append(w.astype(dtype))
        ss.append(jax.random.uniform(jax.random.key(seed - i - 1), (n,), jnp.float32, 1e-3, 1e-2))
    return ws, ss


def timed(fn, *args, reps: int = 7) -> float:
    """Median seconds of one pass of fn (compiled and run once first)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / PASSES


def over_copies(product):
    """PASSES passes of product over every weight copy in one program, so that dispatch does not
    count; each pass's input depends on the last pass (x * 0 is not folded for floats)."""
    def passes(x, ws, ss):
        def one(_, carry):
            xi = x + (carry * 0).astype(x.dtype)
            return carry + sum(product(xi, w, s).astype(jnp.float32).sum() for w, s in zip(ws, ss))
        return jax.lax.fori_loop(0, PASSES, one, jnp.float32(0))
    return jax.jit(passes)


def xla_product(x, w, s):
    """XLA's weight-only product, as the model runs it (model.matmul without the kernel)."""
    return model.matmul("mk,kn->mn", x, w, s)


def xla_fp8_product(x, w, s):
    """XLA's fp8 GEMM (W8A8, as model.matmul runs it for prefill-sized batches)."""
    xq, xs = model.quantize_rows(x, w.dtype)
    y = jnp.einsum("mk,kn->mn", xq, w, preferred_element_type=jnp.float32)
    return (y * xs * s).astype(x.dtype)


def check(kernel, x, w_t, s, config):
    got = np.asarray(kernel.matmul(x, w_t, s, config=config), np.float32)
    want = np.asarray(x, np.float32) @ np.asarray(w_t.astype(jnp.float32)).T * np.asarray(s)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-2, f"{config}: relative error {err}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama2-7b", choices=SHAPES)
    p.add_argument("--rows", type=int, nargs="+", default=[2, 32])
    p.add_argument("--dtype", nargs="+", default=["int8"], choices=DTYPES)
    p.add_argument("--kernel", default="jaxtp", choices=GRIDS)
    args = p.parse_args(argv)
    kernel, grid = GRIDS[args.kernel]
    configs = [kernel.Config(**dict(zip(grid, v))) for v in itertools.product(*grid.values())]
    rows_out = []
    for dname, (name, (k, n)) in itertools.product(args.dtype, SHAPES[args.shape].items()):
        copies = min(64, max(2, -(-256 * 2 ** 20 // (k * n))))
        ws, ss = weights(k, n, DTYPES[dname], copies)
        gb = copies * k * n / 1e9
        for m in args.rows:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            xla = timed(over_copies(xla_product), x, ws, ss)
            fp8 = timed(over_copies(xla_fp8_product), x, ws, ss) if dname == "fp8" else float("nan")
            best = None
            w_ts = [w.T for w in ws]  # as quantize.py stores the wide projections
            for c in configs:
                try:
                    check(kernel, x, w_ts[0], ss[0], c)
                    t = timed(over_copies(lambda x, w, s, c=c: kernel.matmul(x, w, s, config=c)), x, w_ts, ss)
                except Exception as e:  # a config Triton cannot build is skipped, and said
                    print(f"  {dname} {name} m={m} {c}: {type(e).__name__}: {str(e)[:120]}")
                    continue
                if best is None or t < best[0]:
                    best = (t, c)
            if best is None:
                continue
            rows_out.append((dname, name, k, n, m, gb / xla, gb / fp8, gb / best[0], best[1]))
            print(rows_out[-1], flush=True)
    print(f"\n{'dtype':>5} {'proj':>8} {'K':>6} {'N':>6} {'rows':>4} {'XLA GB/s':>9} {'XLA fp8':>8} "
          f"{'kernel':>7}  best config")
    for d, name, k, n, m, a, f, b, cfg in rows_out:
        print(f"{d:>5} {name:>8} {k:>6} {n:>6} {m:>4} {a:>9.0f} {f:>8.0f} {b:>7.0f}  "
              f"{cfg}")


if __name__ == "__main__":
    main()
