"""Run scripts/benchmark.py with one experimental change patched into the model, so one device
call can time several candidate changes in the real decode step before any is committed.

    python scripts/gpu/variant.py VARIANT[+VARIANT...] [benchmark args...]

Variants:
  base            no change
  gemv_only       Pallas GEMV, XLA attention (with --kernels pallas)
  attn_only       Pallas attention, XLA projections (with --kernels pallas)
  gemv=bn,bk,splits,warps,stages,dot   the GEMV's default tiles
  norm_barrier    materialize each RMSNorm output (keeps the norm out of the next GEMM's prologue)
  pad_rows        row-parallel matmuls of one row get a zero second row (keeps XLA's dot a GEMV)
"""
import functools
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent))


def apply(name: str) -> None:
    import jax
    import jax.numpy as jnp

    from jaxtp import decode_ops, model
    from jaxtp.kernels import gemv

    if name == "base":
        return
    if name == "gemv_only":
        decode_ops.attention = lambda *a, **k: None
    elif name == "attn_only":
        decode_ops.column_matmul = lambda x, w, spec, fallback: fallback(x, w)
        decode_ops.local_matmul = lambda x, w, fallback: fallback(x, w)
    elif name.startswith("gemv="):
        bn, bk, splits, warps, stages, dot = name.split("=")[1].split(",")
        cfg = gemv.Config(int(bn), int(bk), int(splits), int(warps), int(stages),
                          None if dot == "auto" else dot == "1")
        gemv.gemv = functools.partial(gemv.gemv, config=cfg)
    elif name == "norm_barrier":
        call = model.RMSNorm.__call__
        model.RMSNorm.__call__ = lambda self, x: jax.lax.optimization_barrier(call(self, x))
    elif name == "pad_rows":
        row = model.row_matmul

        def padded(x, w, s):
            if x.shape[0] * x.shape[1] != 1:
                return row(x, w, s)
            return row(jnp.concatenate([x, jnp.zeros_like(x)], axis=0), w, s)[:1]
        model.row_matmul = padded
    else:
        raise SystemExit(f"unknown variant {name!r}")


if __name__ == "__main__":
    for v in sys.argv[1].split("+"):
        apply(v)
    import benchmark
    benchmark.main(sys.argv[2:])
