"""Which weight layout makes XLA's decode GEMVs fastest? Times y = x @ W for Llama-2-7B's
projection shapes with W stored [in, out] (jaxtp today) and [out, in] (HF's, rows contiguous
along the reduction), 32 distinct weights per call (like 32 layers), one kernel after another.
Prints us per GEMV and the bandwidth reached; compare with benchmark.py's measured HBM read rate.

    python scripts/gpu/gemv_layouts.py [--tp 1] [--batch 1 32] [--small]
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {"qkv": (4096, 12288), "o_proj": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}


def run(name, d_in, d_out, batch, layout, n=32):
    key = jax.random.key(0)
    shape, spec = {"in_out": ((n, d_in, d_out), "bi,io->bo"), "out_in": ((n, d_out, d_in), "bi,oi->bo"),
                   # jaxtp's fused q|k|v [d, tp, w] / gate|up [d, 2, I]: a split axis of 2
                   "fused3d": ((n, d_in, 2, d_out // 2), "bi,ikw->bkw")}[layout]
    # separate arrays, not slices of one stacked array (XLA would copy each slice before its dot)
    w = [jax.random.normal(jax.random.fold_in(key, i), shape[1:], jnp.bfloat16) for i in range(n)]
    x = jax.random.normal(key, (batch, d_in), jnp.bfloat16)

    @jax.jit
    def f(x, w, zero):
        acc = jnp.zeros((batch, d_out), jnp.float32)
        for i in range(n):  # unrolled: n kernels back to back, each depending on the last
            y = jnp.einsum(spec, x, w[i], preferred_element_type=jnp.float32).reshape(batch, d_out)
            acc = acc + y
            x = x + (y[:, :1] * zero).astype(x.dtype)
        return acc

    zero = jnp.zeros((), jnp.float32)
    f(x, w, zero).block_until_ready()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        f(x, w, zero).block_until_ready()
        times.append(time.perf_counter() - t0)
    us = float(np.median(times)) / n * 1e6
    gbs = d_in * d_out * 2 / (us * 1e-6) / 1e12
    print(f"{name:8s} [{d_in:5d},{d_out:5d}] b{batch:<3d} {layout:7s} {us:8.2f} us  {gbs:5.2f} TB/s", flush=True)
    del w


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--small", action="store_true", help="tiny shapes (a CPU dry run)")
    a = p.parse_args()
    print(jax.devices()[0].device_kind, jax.__version__)
    for batch in a.batch:
        for name, (d_in, d_out) in SHAPES.items():
            if name in ("qkv", "gate_up"):
                d_out //= a.tp
            else:
                d_in //= a.tp
            if a.small:
                d_in, d_out = d_in // 64, d_out // 64
            for layout in ("in_out", "out_in") + (("fused3d",) if name in ("qkv", "gate_up") else ()):
                run(name, d_in, d_out, batch, layout)


if __name__ == "__main__":
    main()
