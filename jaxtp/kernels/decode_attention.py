"""A Pallas (Triton) decode attention kernel: one new query per row against its cached keys.

XLA computes decode attention as separate kernels (scores over the whole cache, mask, softmax,
probabilities times values) that write and re-read [B, heads, max_len] intermediates and always
cover the full cache length. This kernel is flash-decoding: the grid is (row, KV head, split of
the sequence); each program streams its part of that head's keys and values once, up to the
row's length only, keeping an online softmax in registers, and writes an unnormalized partial
output with its running max and sum; XLA merges the `splits` partials. The query heads that share
a KV head (GQA) are handled together, padded to 16 rows for the tensor cores.

Runs on GPUs through Triton and anywhere in Pallas interpret mode (the CPU tests).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

TARGET_PROGRAMS = 512  # ~4 per SM on an H100/H200


@dataclasses.dataclass(frozen=True)
class Config:
    block: int = 64        # keys per loop step, at most (a power of two dividing the cache length)
    chunk: int = 256       # keys per program (a split of the sequence), at most
    warps: int = 4
    stages: int = 3


def supported(max_len: int, head_dim: int, config: Config = Config()) -> bool:
    return math.gcd(max_len, config.block) >= 16 and head_dim in (16, 32, 64, 128, 256)


def attend(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lo: jax.Array, hi: jax.Array,
           config: Config = Config(), interpret: bool | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v over cache positions [lo[b], hi[b]) of each row.

    q [B, KVH, G, D] (G query heads per KV head); caches [B, KVH, S, D]; lo, hi [B] int32.
    Returns float32 [B, KVH, G, D].
    """
    b, kvh, g, d = q.shape
    s = k_cache.shape[2]
    if not supported(s, d, config):
        raise ValueError(f"decode attention: unsupported cache length {s} / head_dim {d} for {config}")
    c = dataclasses.replace(config, block=math.gcd(s, config.block))
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    chunk = math.gcd(s, c.chunk)
    while b * kvh * (s // chunk) < TARGET_PROGRAMS and chunk > c.block:
        chunk //= 2  # short caches or few rows: more, shorter splits keep every SM streaming
    splits, per_chunk = s // chunk, chunk // c.block
    rows = max(16, pl.next_power_of_2(g))
    if rows != g:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - g), (0, 0)))
    scale = d ** -0.5

    def kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref):
        row, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        start, end = lo_ref[row], hi_ref[row]
        base = split * chunk
        first = jnp.clip((start - base) // c.block, 0, per_chunk)
        last = jnp.clip(pl.cdiv(end - base, c.block), first, per_chunk)
        qt = q_ref[row, head]                                           # [rows, D]

        def body(i, carry):
            m, l, acc = carry
            at = base + i * c.block
            keys = pl.ds(pl.multiple_of(at, c.block), c.block)
            kt, vt = k_ref[row, head, keys, :], v_ref[row, head, keys, :]
            scores = plt.dot(qt, kt.astype(qt.dtype), trans_b=True) * scale  # [rows, block] f32
            pos = at + jnp.arange(c.block)
            scores = jnp.where((pos >= start) & (pos < end), scores, -jnp.inf)
            m_new = jnp.maximum(m, scores.max(axis=1))
            safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)          # a fully masked block
            alpha, p = jnp.exp(m - safe), jnp.exp(scores - safe[:, None])
            pv = plt.dot(p.astype(vt.dtype), vt)
            return m_new, l * alpha + p.sum(axis=1), acc * alpha[:, None] + pv

        init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
                jnp.zeros((rows, d), jnp.float32))
        m, l, acc = jax.lax.fori_loop(first, last, body, init)
        o_ref[row, head, split] = acc
        m_ref[row, head, split] = m
        l_ref[row, head, split] = l

    f32 = jnp.float32
    o, m, l = pl.pallas_call(
        kernel, grid=(b, kvh, splits), interpret=interpret,
        out_shape=(jax.ShapeDtypeStruct((b, kvh, splits, rows, d), f32),
                   jax.ShapeDtypeStruct((b, kvh, splits, rows), f32),
                   jax.ShapeDtypeStruct((b, kvh, splits, rows), f32)),
        compiler_params=plt.CompilerParams(num_warps=c.warps, num_stages=c.stages),
    )(lo.astype(jnp.int32), hi.astype(jnp.int32), q, k_cache, v_cache)
    # Merge the splits: rescale each partial to the overall max (an empty split has m = -inf).
    top = m.max(axis=2, keepdims=True)
    w = jnp.where(m == -jnp.inf, 0.0, jnp.exp(m - top))
    out = (o * w[..., None]).sum(axis=2) / (l * w).sum(axis=2)[..., None]
    return out[:, :, :g]
