"""A Pallas (Triton) flash-attention kernel for prefill chunks over the paged KV cache.

A chunk of a prompt attends causally to everything its sequence has in the pages: the earlier
chunks and itself (its keys and values are written to the pages first). The grid is (row, query
head, block of queries); each program keeps its queries in registers, streams its KV head's
pages in table order up to the causal bound of its last query, and keeps an online softmax, so
no [T, S] score matrix is ever stored. Pages past a query block's causal bound are never read,
so a chunk costs what its own causal triangle plus the earlier context cost.

Runs on GPUs through Triton and anywhere in Pallas interpret mode (the CPU tests).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxtp.ops import paged
from jaxtp.ops.kernels.decode_attention import supported  # the same pages and heads



@dataclasses.dataclass(frozen=True)
class Config:
    block_q: int = 128   # queries per program, at most (the chunk length if shorter)
    pages: int = 1       # pages per loop step
    warps: int = 4       # 443 TFLOP/s at 128k on an H200, against 294 with 8 (docs/performance.md)
    stages: int = 3


LOG2E = 1.4426950408889634


def attend(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, table: jax.Array, starts: jax.Array,
           window: int | None = None, config: Config = Config(), interpret: bool | None = None) -> jax.Array:
    """q [B, T, H, D] (rotated) at positions starts[b] + t, over key pages [P, KVH, page_size, D]
    and value pages [P, KVH, D, page_size] listed by table [B, W] -> [B, T, H, D] in q's dtype:
    softmax(q k^T / sqrt(D)) v over the positions <= each query's (and, with a sliding window, >
    its position - window)."""
    (b, t, h, d), (_, kvh, size, _) = q.shape, k_pages.shape
    if not supported(size, d) or h % kvh or t & (t - 1) or v_pages.shape != paged.value_pages_shape(k_pages.shape):
        raise ValueError(f"prefill attention: unsupported q {q.shape} / pages {k_pages.shape}, {v_pages.shape}")
    block_q = min(config.block_q, t)
    full = str(jax.config.jax_default_matmul_precision).lower() in ("highest", "float32")
    kernel = functools.partial(_kernel, block_q=block_q, size=size, width=table.shape[1], group=h // kvh,
                               scale=d ** -0.5 * LOG2E, window=window, pages=config.pages,
                               precision=(jax.lax.Precision.HIGHEST,) * 2 if full else None)
    return pl.pallas_call(
        kernel, grid=(b, h, t // block_q), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=jax.default_backend() != "gpu" if interpret is None else interpret,
        compiler_params=plt.CompilerParams(num_warps=config.warps, num_stages=config.stages),
    )(starts.astype(jnp.int32), table.astype(jnp.int32), q, k_pages, v_pages)


def _kernel(start_ref, table_ref, q_ref, k_ref, v_ref, out_ref, *, block_q, size, width, group, scale, window,
            pages, precision):
    """One program: row, query head, block of queries. Scores are kept in base 2 (scale carries
    log2 e), so the softmax's exponentials are exp2."""
    row, head, blk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kv, queries = head // group, pl.ds(blk * block_q, block_q)
    q = q_ref[row, queries, head, :]
    q0 = start_ref[row] + blk * block_q
    q_pos = q0 + jnp.arange(block_q)
    keys = pl.ds(0, size)

    def page_step(j, carry):  # the keys of table entry j (past the table: masked, entry clipped)
        m, l, acc = carry
        page = table_ref[row, jnp.minimum(j, width - 1)]
        scores = plt.dot(q, k_ref[page, kv, keys, :].astype(q.dtype), trans_b=True, precision=precision) * scale
        k_pos = j * size + jnp.arange(size)
        visible = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            visible &= k_pos[None, :] > q_pos[:, None] - window
        scores = jnp.where(visible, scores, -jnp.inf)
        m_new = jnp.maximum(m, scores.max(axis=1))
        safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha, p = jnp.exp2(m - safe), jnp.exp2(scores - safe[:, None])
        pv = plt.dot(p.astype(q.dtype), v_ref[page, kv, :, keys].astype(q.dtype), trans_b=True, precision=precision)
        return m_new, l * alpha + p.sum(axis=1), acc * alpha[:, None] + pv

    def body(i, carry):
        for j in range(pages):
            carry = page_step(i * pages + j, carry)
        return carry

    last = jnp.minimum((q0 + block_q - 1) // size + 1, width)  # table entries up to the causal bound
    first = 0 if window is None else jnp.maximum(q0 - window + 1, 0) // size
    init = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32),
            jnp.zeros((block_q, q.shape[-1]), jnp.float32))
    m, l, acc = jax.lax.fori_loop(first // pages, pl.cdiv(last, pages), body, init)
    out_ref[row, queries, head, :] = (acc / l[:, None]).astype(out_ref.dtype)
