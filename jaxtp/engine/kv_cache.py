"""The KV cache: per layer, a pool of pages of keys [pages, kv_heads, page_size, head_dim] and
of values [pages, kv_heads, head_dim, page_size], split on heads over tp and on pages over dp
(each replica owns its own pages and indexes them from 0). Values keep their positions last, so
attention's probabilities-times-values product reads them along its contraction, as the tensor
cores' operand wants (8-bit values have no transposing shared-memory load). A sequence's block
table lists the pages holding its positions, so memory goes to the tokens that exist, not to a
fixed maximum length per row.

The cache is donated to every step and updated in place. With pipeline stages (pp > 1) there is
one entry per layer *of a stage*, stacked over stages: [pp, pages, kv_heads, ...], split on
`pp` (see pipeline.py).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxtp.ops.paged import value_pages_shape
from jaxtp.sharding import KV_CACHE_SPEC, STAGED_KV_CACHE_SPEC, named, pp_size

PAGE_SIZE = 64  # tokens per page: one block of the decode kernel's loop (docs/performance.md)


class KVCache(NamedTuple):
    k: list  # num_layers x [P, KVH, page_size, D]
    v: list  # num_layers x [P, KVH, D, page_size]


def cache_sharding(mesh: Mesh, ndim: int = 4):
    return named(mesh, STAGED_KV_CACHE_SPEC if ndim == 5 else KV_CACHE_SPEC)


def shape(num_layers: int, pages: int, kv_heads: int, page_size: int, head_dim: int,
          pp: int = 1) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """(number of cache entries, shape of each keys entry, of each values entry) for this many
    layers split into pp stages; `pages` counts the pages of all dp replicas."""
    keys = (pages, kv_heads, page_size, head_dim) if pp == 1 else (pp, pages, kv_heads, page_size, head_dim)
    return num_layers // pp, keys, value_pages_shape(keys)


def init(num_layers: int, pages: int, kv_heads: int, page_size: int, head_dim: int, dtype,
         mesh: Mesh) -> KVCache:
    """Allocate a zeroed pool directly in its sharding (each device gets only its heads and its
    replica's pages, and with pipeline stages only its stage's layers)."""
    n, k_shape, v_shape = shape(num_layers, pages, kv_heads, page_size, head_dim, pp_size(mesh))
    zeros = jax.jit(lambda s: jnp.zeros(s, dtype), static_argnums=0,
                    out_shardings=cache_sharding(mesh, len(k_shape)))
    return KVCache([zeros(k_shape) for _ in range(n)], [zeros(v_shape) for _ in range(n)])
