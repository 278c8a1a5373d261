"""Run scripts/benchmark.py with one experimental change patched into the model, so one device
call can time several candidate changes in the real decode step before any is committed.

    python scripts/gpu/variant.py VARIANT[+VARIANT...] [benchmark args...]

Variants:
  base            no change
  attn=block,chunk,warps,stages   the Pallas decode attention's tiles (with --kernels pallas)
  norm_barrier    materialize each RMSNorm output (keeps the norm out of the next GEMM's prologue)
  no_pad          row-parallel matmuls of one row are not padded to two (model.row_matmul)
  pad_all         every projection of one row is padded to two rows, column-split ones too
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

    from jaxtp import model
    from jaxtp.kernels import decode_attention

    if name == "base":
        return
    if name.startswith("attn="):
        block, chunk, warps, stages = map(int, name.split("=")[1].split(","))
        cfg = decode_attention.Config(block, chunk, warps, stages)
        decode_attention.attend = functools.partial(decode_attention.attend, config=cfg)
    elif name == "norm_barrier":
        call = model.RMSNorm.__call__
        model.RMSNorm.__call__ = lambda self, x: jax.lax.optimization_barrier(call(self, x))
    elif name == "no_pad":
        model.row_matmul = lambda x, w, s: model.matmul("...i,io->...o", x, w, s)
    elif name == "pad_all":
        plain = model.matmul

        def padded(spec, x, w, s):
            if x.ndim < 2 or x.shape[0] * x.shape[1] != 1:
                return plain(spec, x, w, s)
            return plain(spec, jnp.concatenate([x, jnp.zeros_like(x)]), w, s)[:1]
        model.matmul = padded
    else:
        raise SystemExit(f"unknown variant {name!r}")


if __name__ == "__main__":
    for v in sys.argv[1].split("+"):
        apply(v)
    import benchmark
    benchmark.main(sys.argv[2:])
