"""Check the Pallas decode step (jaxtp/ops/kernels/decode_attention.py: rope, cache write,
attention, through shuffled block tables) against XLA's on a contiguous cache on a GPU in bf16, at Llama-2-7B (MHA) and Llama-3-8B (GQA) shapes per
device at tp 1 and 2: the written caches must be bitwise equal (the kernel rounds the rotary
embedding as XLA does), the attention output within bf16 rounding, the padding row zero, and
`--repeats` more calls bitwise equal to the first, each taking the arrival counters the call
before handed back (the splits are merged by whichever program arrives last: a missing release /
acquire, or a counter not reset, would show here as a changed output). Timing is left
to the decode step (benchmark.py): stand-alone timings disagreed with it (docs/performance.md).
The prefill kernel (kernels/prefill_attention.py) is checked the same way against XLA's softmax
for a chunk that starts after earlier context. `--kv-cache-dtype fp8` runs both on e4m3 pages
(XLA's path as the model's: saturated writes, pages read as bf16).

    python benchmarks/pallas_check.py [--batch 1 8 32] [--repeats 200] [--kv-cache-dtype fp8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxtp import rope  # noqa: E402
from jaxtp.entrypoints.api import KV_CACHE_DTYPES  # noqa: E402
from jaxtp.ops import paged  # noqa: E402
from jaxtp.ops.kernels import decode_attention, prefill_attention  # noqa: E402

PAGE = 64


def write(cache, new, pos):
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n, (0, s, 0)))(cache, new, pos)


def to_pages(cache, size: int = PAGE, seed: int = 0, positions_last: bool = False):
    """A contiguous cache [B, KVH, S, D] as a pool of `size`-token pages in shuffled order (page
    0 left as scratch; [P, KVH, size, D], or [P, KVH, D, size] for values: positions_last) and
    its block table [B, S / size]. The tests use it too."""
    b, kvh, s, d = cache.shape
    w = s // size
    table = jnp.asarray(np.random.default_rng(seed).permutation(b * w).reshape(b, w) + 1, jnp.int32)
    blocks = cache.reshape(b, kvh, w, size, d).transpose(0, 2, 1, 3, 4).reshape(b * w, kvh, size, d)
    blocks = blocks.swapaxes(2, 3) if positions_last else blocks
    return jnp.zeros((b * w + 1, *blocks.shape[1:]), cache.dtype).at[table.reshape(-1)].set(blocks), table


def to_value_pages(cache, size: int = PAGE, seed: int = 0):
    return to_pages(cache, size, seed, positions_last=True)


def from_pages(pages, table, positions_last: bool = False):
    return paged.gather(pages, table, positions_last=positions_last)


def from_value_pages(pages, table):
    return from_pages(pages, table, positions_last=True)


def xla_step(qkv, cos, sin, k_cache, v_cache, pos, num_heads):
    """The model's XLA path (model.Attention with kernels="xla") for one token per row."""
    b, kvh, s, d = k_cache.shape
    q, k, v = jnp.split(qkv[:b, None], [num_heads, num_heads + kvh], axis=2)
    q, k = rope.apply(q, cos[:, None], sin[:, None]), rope.apply(k, cos[:, None], sin[:, None])
    k_cache = write(k_cache, paged.as_cached(k.transpose(0, 2, 1, 3), k_cache.dtype), pos)
    v_cache = write(v_cache, paged.as_cached(v.transpose(0, 2, 1, 3), v_cache.dtype), pos)
    scores = jnp.einsum("bkgd,bksd->bkgs", q[:, 0].reshape(b, kvh, -1, d), k_cache.astype(q.dtype),
                        preferred_element_type=jnp.float32) * d ** -0.5
    scores = jnp.where(jnp.arange(s)[None, None, None] <= pos[:, None, None, None], scores,
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgs,bksd->bkgd", probs, v_cache.astype(q.dtype), preferred_element_type=jnp.float32)
    return out, k_cache, v_cache


def check(name: str, batch: int, heads: int, kv_heads: int, repeats: int, max_len: int = 1152,
          d: int = 128, cache_dtype=jnp.bfloat16) -> bool:
    key = jax.random.key(batch)
    k1, k2, k3 = jax.random.split(key, 3)
    shape = (batch, kv_heads, max_len, d)
    k_cache = paged.as_cached(jax.random.normal(k1, shape, jnp.bfloat16), cache_dtype)
    v_cache = paged.as_cached(jax.random.normal(k2, shape, jnp.bfloat16), cache_dtype)
    qkv = jax.random.normal(k3, (batch + (batch == 1), heads + 2 * kv_heads, d), jnp.bfloat16)
    pos = jnp.asarray(np.random.default_rng(batch).integers(0, max_len, batch), jnp.int32)
    freq, scale = rope.inv_freq(d, 10000.0, {}, 4096)
    cos, sin = (x[:, 0] for x in rope.cos_sin(pos[:, None], freq, scale))
    want = jax.jit(xla_step, static_argnums=6)(qkv, cos, sin, k_cache, v_cache, pos, heads)
    (k_pages, table), (v_pages, _) = to_pages(k_cache, seed=batch), to_value_pages(v_cache, seed=batch)
    step = jax.jit(lambda *a: decode_attention.attend(*a[:8], num_heads=heads, counters=a[8]))
    counters = jnp.zeros((batch, kv_heads), jnp.int32)
    out0, k_got, v_got, counters = step(qkv, cos, sin, k_pages, v_pages, table, pos, jnp.zeros_like(pos), counters)
    err = float(jnp.max(jnp.abs(out0[:batch] - want[0])))
    got = (from_pages(k_got, table), from_value_pages(v_got, table))
    same = [bool(jnp.array_equal(g, w)) for g, w in zip(got, want[1:])]
    zero = bool(jnp.all(out0[batch:] == 0))
    again = True
    for _ in range(repeats):  # each call gets the counters the last one handed back, as layers do
        out, *_, counters = step(qkv, cos, sin, k_pages, v_pages, table, pos, jnp.zeros_like(pos), counters)
        again &= bool(jnp.array_equal(out, out0))
    ok = all(same) and err < 2e-2 and zero and again
    print(f"{name:10s} b{batch:<3d} heads {heads:2d}/{kv_heads:2d}: caches bitwise equal {same}, "
          f"out max abs err {err:.3g}, padding zero {zero}, {repeats} repeats equal {again} "
          f"{'ok' if ok else 'FAIL'}", flush=True)
    return ok


def check_prefill(heads: int, kv_heads: int, t: int = 1024, start: int = 3072, d: int = 128,
                  cache_dtype=jnp.bfloat16) -> bool:
    """One chunk of t queries at position `start` against the pages, vs XLA's softmax."""
    k1, k2, k3 = jax.random.split(jax.random.key(t), 3)
    s = start + t
    q = jax.random.normal(k1, (1, t, heads, d), jnp.bfloat16)
    k_cache = paged.as_cached(jax.random.normal(k2, (1, kv_heads, s, d), jnp.bfloat16), cache_dtype)
    v_cache = paged.as_cached(jax.random.normal(k3, (1, kv_heads, s, d), jnp.bfloat16), cache_dtype)
    (k_pages, table), (v_pages, _) = to_pages(k_cache), to_value_pages(v_cache)
    k_cache, v_cache = k_cache.astype(jnp.bfloat16), v_cache.astype(jnp.bfloat16)
    got = jax.jit(prefill_attention.attend)(q, k_pages, v_pages, table, jnp.array([start]))
    g = heads // kv_heads
    scores = jnp.einsum("bthd,bhsd->bhts", q, jnp.repeat(k_cache, g, axis=1),
                        preferred_element_type=jnp.float32) * d ** -0.5
    visible = jnp.arange(s)[None, :] <= start + jnp.arange(t)[:, None]
    probs = jax.nn.softmax(jnp.where(visible[None, None], scores, -jnp.inf), axis=-1).astype(jnp.bfloat16)
    want = jnp.einsum("bhts,bhsd->bthd", probs, jnp.repeat(v_cache, g, axis=1), preferred_element_type=jnp.float32)
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
    ok = err < 2e-2
    print(f"prefill    t{t} at {start} heads {heads:2d}/{kv_heads:2d}: out max abs err {err:.3g} "
          f"{'ok' if ok else 'FAIL'}", flush=True)
    return ok


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    args = p.parse_args()
    dtype = KV_CACHE_DTYPES[args.kv_cache_dtype] or jnp.bfloat16  # the checks run in bf16
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    ok = True
    for b in args.batch:
        for name, heads, kv_heads in [("llama2 tp1", 32, 32), ("llama2 tp2", 16, 16),
                                      ("llama3 tp1", 32, 8), ("llama3 tp2", 16, 4)]:
            ok &= check(name, b, heads, kv_heads, args.repeats, cache_dtype=dtype)
    for heads, kv_heads in [(32, 32), (32, 8)]:
        ok &= check_prefill(heads, kv_heads, cache_dtype=dtype)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
