"""The KV cache: per layer, keys and values [batch, kv_heads, max_len, head_dim], split on heads.

Rows advance independently (each has its own length), so a ragged batch needs no left padding
and a finished row's slot can be reused. The cache is donated to every step and updated in place.
With pipeline stages (pp > 1) there is one entry per layer *of a stage*, stacked over stages:
[pp, batch, kv_heads, max_len, head_dim], split on `pp` (see pipeline.py).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxtp.sharding import KV_CACHE_SPEC, STAGED_KV_CACHE_SPEC, named, pp_size


class KVCache(NamedTuple):
    k: list  # num_layers x [B, KVH, S, D]
    v: list


def cache_sharding(mesh: Mesh, ndim: int = 4):
    return named(mesh, STAGED_KV_CACHE_SPEC if ndim == 5 else KV_CACHE_SPEC)


def shape(num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
          pp: int = 1) -> tuple[int, tuple[int, ...]]:
    """(number of cache entries, shape of each) for this many layers split into pp stages."""
    one = (batch, kv_heads, max_len, head_dim)
    return (num_layers, one) if pp == 1 else (num_layers // pp, (pp, *one))


def init(num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype,
         mesh: Mesh) -> KVCache:
    """Allocate a zeroed cache directly in its sharding (each device gets only its heads, and
    with pipeline stages only its stage's layers)."""
    n, shp = shape(num_layers, batch, kv_heads, max_len, head_dim, pp_size(mesh))
    zeros = jax.jit(lambda: jnp.zeros(shp, dtype), out_shardings=cache_sharding(mesh, len(shp)))
    return KVCache([zeros() for _ in range(n)], [zeros() for _ in range(n)])
