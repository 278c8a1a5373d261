"""XLA's reads and writes of the paged KV cache: keys / values go into pages through a block
table and come back out as each row's contiguous history. Key pages are [P, KVH, page_size, D],
value pages [P, KVH, D, page_size] (`positions_last`; engine.kv_cache says why). Rows and pages
are split on dp, and each replica's table numbers its own pages from 0, so the work is mapped
over replicas (a batched gather / scatter the SPMD partitioner keeps local to each replica)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

SCRATCH_PAGE = 0  # never handed out (engine.block_manager): idle and padding rows write here
# Writes name each page position once, but for the scratch page, whose contents are never read:
# so they are scattered as unique (plain stores; else a 16-bit scatter is a compare-and-swap loop).


def saturate(x, dtype):
    """x as the float dtype, values past its range clipped to its largest (clipped in float32:
    float16's largest is no bfloat16 value)."""
    if x.dtype == dtype:
        return x
    top = float(jnp.finfo(dtype).max)
    return jnp.clip(x.astype(jnp.float32), -top, top).astype(dtype)


def as_cached(x, dtype):
    """x in the pages' dtype; 8-bit floats saturate at their largest value (XLA's convert makes
    NaN of what e4m3 cannot hold; vLLM's and Triton's fp8 conversions saturate)."""
    return saturate(x, dtype) if jnp.dtype(dtype).itemsize == 1 else x.astype(dtype)


def per_replica(fn, dp: int, *args):
    """fn on each replica's share: every argument's leading axis split into [dp, n / dp]."""
    if dp == 1:
        return fn(*args)
    out = jax.vmap(fn)(*(x.reshape(dp, x.shape[0] // dp, *x.shape[1:]) for x in args))
    return out.reshape(-1, *out.shape[2:])


def take_rows(x, index, dp: int = 1):
    """Rows `index` [n, ...] (each replica numbering its own) of x [dp * m, ...] (each
    replica's m rows in turn) -> [n, ..., x's trailing axes]."""
    return per_replica(lambda a, i: a[i], dp, x, index)


def value_pages_shape(key_pages_shape) -> tuple[int, ...]:
    """The value pages' shape for key pages of this shape ([..., page_size, D] -> [..., D, page_size])."""
    *lead, size, d = key_pages_shape
    return (*lead, d, size)


def _page_size(pages, positions_last: bool) -> int:
    return pages.shape[3 if positions_last else 2]


def _page_ids(table, index):
    """The pages of table entries index [B, n] of each row's table [B, W]; past it, scratch."""
    width = table.shape[1]
    return jnp.where(index < width, jnp.take_along_axis(table, jnp.minimum(index, width - 1), axis=1),
                     SCRATCH_PAGE)


def write(pages, new, table, pos, dp: int = 1, positions_last: bool = False):
    """new [B, T, KVH, D] into pages [P, KVH, page_size, D] ([P, KVH, D, page_size] if
    positions_last) at positions pos [B, T], through table [B, W]. Positions past the table
    (padding) go to the scratch page."""
    def local(pages, new, table, pos):
        size = _page_size(pages, positions_last)
        ids, at = _page_ids(table, pos // size), pos % size
        where = (ids, slice(None), slice(None), at) if positions_last else (ids, slice(None), at, slice(None))
        return pages.at[where].set(as_cached(new, pages.dtype), unique_indices=True)
    return per_replica(local, dp, pages, new, table, pos)


def write_pages(pages, new, table, start, dp: int = 1, positions_last: bool = False):
    """new [B, T, KVH, D] into pages (as `write` lays them out) whole: row b's tokens fill the
    pages from table entry start[b] / page_size on, for rows that start on a page boundary and
    span whole pages (T a multiple of page_size). Entries past the table go to the scratch page.
    The same writes as `write`, but each page's block is one contiguous update (a token's is
    strided)."""
    def local(pages, new, table, start):
        (b, t, kvh, d), size = new.shape, _page_size(pages, positions_last)
        ids = _page_ids(table, start[:, None] // size + jnp.arange(t // size)[None, :])
        blocks = new.reshape(b, t // size, size, kvh, d)  # -> one [KVH, size, D] or [KVH, D, size] a page
        blocks = blocks.transpose(0, 1, 3, 4, 2) if positions_last else blocks.swapaxes(2, 3)
        blocks = blocks.reshape(-1, *blocks.shape[2:])
        return pages.at[ids.reshape(-1)].set(as_cached(blocks, pages.dtype), unique_indices=True)
    return per_replica(local, dp, pages, new, table, start)


def gather(pages, table, dp: int = 1, positions_last: bool = False):
    """Each row's pages (laid out as `write` lays them) in table order: [B, KVH, W * page_size, D]."""
    def local(pages, table):
        rows = pages[table]  # [B, W, KVH, page_size, D]
        rows = rows.swapaxes(3, 4) if positions_last else rows
        b, w, kvh, size, d = rows.shape
        return rows.transpose(0, 2, 1, 3, 4).reshape(b, kvh, w * size, d)
    return per_replica(local, dp, pages, table)
