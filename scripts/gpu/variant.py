"""Run scripts/benchmark.py with one experimental change patched into the model, so one device
call can time several candidate changes in the real decode step before any is committed.

    python scripts/gpu/variant.py VARIANT[+VARIANT...] [benchmark args...]

Variants:
  base            no change
  attn=block,programs,warps,stages   the Pallas decode step's tiles and grid (--kernels pallas)
  norm_barrier    materialize each RMSNorm output (keeps the norm out of the next GEMM's prologue)
"""
import functools
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent))


def apply(name: str) -> None:
    import jax

    from jaxtp import model
    from jaxtp.kernels import decode_attention

    if name == "base":
        return
    if name.startswith("attn="):
        block, programs, warps, stages = map(int, name.split("=")[1].split(","))
        cfg = decode_attention.Config(block, programs, warps=warps, stages=stages)
        decode_attention.attend = functools.partial(decode_attention.attend, config=cfg)
    elif name == "norm_barrier":
        call = model.RMSNorm.__call__
        model.RMSNorm.__call__ = lambda self, x: jax.lax.optimization_barrier(call(self, x))
    else:
        raise SystemExit(f"unknown variant {name!r}")


if __name__ == "__main__":
    for v in sys.argv[1].split("+"):
        apply(v)
    import benchmark
    benchmark.main(sys.argv[2:])
