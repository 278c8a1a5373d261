"""Run scripts/benchmark.py with one experimental change patched into the model, so one device
call can time several candidate changes in the real decode step before any is committed.

    python scripts/gpu/variant.py VARIANT[+VARIANT...] [benchmark args...]

Variants:
  base            no change
  attn=block,programs,warps,stages   the Pallas decode step's tiles and grid (--kernels pallas)
  noqkvfold       qkv's split-K partials summed by XLA, not by the decode kernel
  norm_barrier    materialize each RMSNorm output (keeps the norm out of the next GEMM's prologue)
  qkv_split=S     decode (<= 8 rows): qkv's contraction split S ways by the model (a batched GEMM
                  of float32 partials, summed by XLA), in place of XLA's own split-K choice
  rowsplit=o:S,down:S   the same for o_proj / down_proj at tp 1 (residual add and norm by XLA)
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
    elif name == "noqkvfold":
        from jaxtp import decode_ops
        decode_ops.QKV_SPLIT_ROWS = 0
    elif name.startswith("qkv_split="):
        qkv_split(int(name.split("=")[1]))
    elif name.startswith("rowsplit="):
        row_split(dict((k, int(v)) for k, v in (kv.split(":") for kv in name.split("=")[1].split(","))))
    elif name == "norm_barrier":
        call = model.RMSNorm.__call__
        model.RMSNorm.__call__ = lambda self, x: jax.lax.optimization_barrier(call(self, x))
    else:
        raise SystemExit(f"unknown variant {name!r}")


def qkv_split(splits: int) -> None:
    from jaxtp import model
    call = model.QKVLinear.__call__

    def patched(self, x):
        if x.shape[0] * x.shape[1] > 8 or self.scale is not None:
            return call(self, x)
        y = self.partials(x, splits).sum(0).astype(x.dtype)
        return y if self.bias is None else y + self.bias[...].reshape(y.shape[-3:])
    model.QKVLinear.__call__ = patched


def row_split(splits: dict) -> None:
    from jaxtp import model
    add_norm = model.RowLinear.add_norm

    def patched(self, x, residual, norm):
        w = self.weight[...]
        which = "o" if w.shape[0] == w.shape[1] else "down"
        s = splits.get(which)
        if not s or x.shape[0] * x.shape[1] > 8 or self.scale is not None:
            return add_norm(self, x, residual, norm)
        new = residual + model.split_matmul(x, w, s).sum(0).astype(x.dtype)
        return new, None if norm is None else model.rms_norm(new, norm.weight[...], norm.eps)
    model.RowLinear.add_norm = patched


if __name__ == "__main__":
    for v in sys.argv[1].split("+"):
        apply(v)
    import benchmark
    benchmark.main(sys.argv[2:])
