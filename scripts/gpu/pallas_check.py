"""Check the Pallas decode attention (jaxtp/kernels/decode_attention.py) against XLA's on a GPU
at Llama-2-7B shapes (tp 1 and 2), and time both over `--layers` distinct caches in one jitted
call. The timings here disagreed with the decode step's by up to 2x (NOTES.md, session 4): use
them for correctness and rough size only, and decide in the step (benchmark.py, variant.py).

    python scripts/gpu/pallas_check.py [--batch 1 32]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jaxtp.kernels import decode_attention

def timed_us(fn, *args, reps=20) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def check_attention(batch: int, layers: int, max_len: int = 1152, live: int = 1040):
    key = jax.random.key(1)
    for tp in (1, 2):
        kvh, d = 32 // tp, 128
        shape = (batch, kvh, max_len, d)
        ks = [jax.random.normal(jax.random.fold_in(key, i), shape, jnp.bfloat16) for i in range(layers)]
        vs = [jax.random.normal(jax.random.fold_in(key, 100 + i), shape, jnp.bfloat16) for i in range(layers)]
        q = jax.random.normal(key, (batch, kvh, 1, d), jnp.bfloat16)
        hi = jnp.full((batch,), live, jnp.int32)
        lo = jnp.zeros_like(hi)

        def xla_one(q, k, v):  # the model's einsum attention over the whole cache, masked
            s = jnp.einsum("bkgd,bksd->bkgs", q, k, preferred_element_type=jnp.float32) * d ** -0.5
            s = jnp.where(jnp.arange(max_len) < live, s, jnp.finfo(jnp.float32).min)
            p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
            return jnp.einsum("bkgs,bksd->bkgd", p, v, preferred_element_type=jnp.float32)

        xla = jax.jit(lambda q, ks, vs: [xla_one(q, k, v) for k, v in zip(ks, vs)])
        pallas = jax.jit(lambda q, ks, vs: [decode_attention.attend(q, k, v, lo, hi) for k, v in zip(ks, vs)])
        want, got = xla(q, ks, vs), pallas(q, ks, vs)
        err = max(float(jnp.max(jnp.abs(g - w))) for g, w in zip(got, want))
        live_bytes = 2 * batch * kvh * live * d * 2
        t_x, t_p = timed_us(xla, q, ks, vs) / layers, timed_us(pallas, q, ks, vs) / layers
        print(f"attention b{batch} tp{tp} live {live}/{max_len}: xla {t_x:6.1f} us, pallas {t_p:6.1f} us "
              f"({live_bytes / t_p / 1e6:4.2f} TB/s of live KV), max err {err:.3g}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--layers", type=int, default=16)
    args = p.parse_args()
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    for b in args.batch:
        check_attention(b, 8 if b > 8 else args.layers)


if __name__ == "__main__":
    main()
