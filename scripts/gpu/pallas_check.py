"""Check the Pallas decode kernels (jaxtp/kernels/gemv.py, decode_attention.py) against XLA on a
GPU at Llama-2-7B shapes, and time both: for each projection, `--layers` distinct weights (more
bytes than L2) multiplied in one jitted call; per-call microseconds and achieved TB/s.

    python scripts/gpu/pallas_check.py [--batch 1 32] [--configs]
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import jax
import jax.numpy as jnp

from jaxtp.kernels import decode_attention, gemv

# (name, K, N) per tp: qkv, gate_up, o_proj, down of Llama-2-7B (d 4096, intermediate 11008)
SHAPES = {1: [("qkv", 4096, 12288), ("gate_up", 4096, 22016), ("o", 4096, 4096), ("down", 11008, 4096)],
          2: [("qkv", 4096, 6144), ("gate_up", 4096, 11008), ("o", 2048, 4096), ("down", 5504, 4096)]}


def timed_us(fn, *args, reps=20) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def check_gemv(batch: int, layers: int, sweep: bool):
    key = jax.random.key(0)
    for tp, shapes in SHAPES.items():
        for name, k, n in shapes:
            ws = [jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.bfloat16) * 0.02 for i in range(layers)]
            x = jax.random.normal(key, (batch, k), jnp.bfloat16)
            nbytes = k * n * 2
            xla = jax.jit(lambda x, ws: [jnp.einsum("bi,io->bo", x, w) for w in ws])
            want = xla(x, ws)
            t_xla = timed_us(xla, x, ws) / layers
            configs = [gemv.Config()]
            if sweep:
                configs += [gemv.Config(bn=bn, bk=bk, warps=wp, stages=st)
                            for bn, bk, wp, st in itertools.product((64, 128, 256), (32, 64), (4, 8), (3,))
                            if (bn, bk, wp, st) != (128, 32, 4, 3)]
                configs += [gemv.Config(splits=s) for s in (1, 2, 8, 16)]
                configs += [gemv.Config(dot=not (batch > 4))]
            best = None
            for c in configs:
                try:
                    fn = jax.jit(lambda x, ws, c=c: [gemv.gemv(x, w, c).astype(x.dtype) for w in ws])
                    got = fn(x, ws)
                    err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))) for g, w in zip(got, want))
                    t = timed_us(fn, x, ws) / layers
                except Exception as e:  # noqa: BLE001
                    print(f"  tp{tp} {name} {c}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                if best is None or t < best[0]:
                    best = (t, c, err)
                if c == configs[0]:
                    default = (t, err)
            if best is None:
                continue
            print(f"gemv b{batch} tp{tp} {name:8} [{k}x{n}] xla {t_xla:6.1f} us ({nbytes / t_xla / 1e6:4.2f} TB/s) | "
                  f"pallas default {default[0]:6.1f} us ({nbytes / default[0] / 1e6:4.2f} TB/s, err {default[1]:.3g}) | "
                  f"best {best[0]:6.1f} us ({nbytes / best[0] / 1e6:4.2f} TB/s) {best[1]}", flush=True)


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
    p.add_argument("--configs", action="store_true", help="sweep GEMV tile configurations")
    args = p.parse_args()
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    for b in args.batch:
        check_attention(b, 8 if b > 8 else args.layers)
    for b in args.batch:
        check_gemv(b, args.layers, args.configs and b == 1)


if __name__ == "__main__":
    main()
