"""When the decode step uses the Pallas attention kernel, and how it runs on sharded arrays.

kernels/decode_attention.py replaces XLA's attention for one new token per row. A Pallas call is
opaque to XLA's SPMD partitioner (it would gather its operands to every device), so with tp > 1
it runs under `shard_map` on the device's own KV heads, as the cache's partition spec says.

(A Pallas GEMV for the projections was measured too, and lost to XLA's GEMMs in the decode step
at every tiling tried: scripts/gpu/NOTES.md, session 4.)

Modes (`jaxtp.load(..., kernels=...)`, stored on the Model, static in the jitted steps):

  "xla"     XLA's own kernels everywhere.
  "pallas"  the Pallas kernel for decode attention (one token per row, at most MAX_ROWS rows)
            where the shapes allow, XLA's elsewhere (prefill, larger batches). Off GPUs it runs
            in Pallas interpret mode: slow, but the same code, which is how the CPU tests check
            it against transformers.
  "auto"    "pallas" on GPUs with pipeline_parallel_size = data_parallel_size = 1, else "xla".
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxtp.kernels import decode_attention

MODES = ("auto", "xla", "pallas")
# Rows up to which the kernel replaces XLA's attention. Llama-2-7B, ctx 1024, 2x H200: batch 1
# gains 2-3% per token at tp 1, ~1% at tp 2; at batch 32 XLA's batched attention is 3-5% faster.
MAX_ROWS = 8

_mesh: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("decode_kernels", default=None)


def resolve(mode: str, mesh: Mesh) -> str:
    if mode not in MODES:
        raise ValueError(f"kernels must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    staged = mesh.shape["pp"] > 1 or mesh.shape["dp"] > 1
    if mode == "pallas" and staged:
        raise ValueError(f"kernels='pallas' needs pipeline_parallel_size = data_parallel_size = 1 "
                         f"(got pp={mesh.shape['pp']}, dp={mesh.shape['dp']})")
    if mode == "auto":
        gpu = {d.platform for d in mesh.devices.flat} == {"gpu"}
        return "pallas" if gpu and not staged else "xla"
    return mode


@contextlib.contextmanager
def use(mesh: Mesh, mode: str):
    """While tracing a step: decode layers use the Pallas kernels if `mode` is "pallas"."""
    token = _mesh.set(mesh if mode == "pallas" else None)
    try:
        yield
    finally:
        _mesh.reset(token)


def _sharded(fn, mesh: Mesh, in_specs, out_specs):
    if mesh.shape["tp"] == 1:
        return fn  # one device holds everything: no partitioning needed
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def attention(q, k_cache, v_cache, positions, window: int | None, cache_spec: P):
    """Decode attention, or None where the kernel does not apply (then XLA's runs).

    q [B, 1, KVH, G, D]; caches [B, KVH, S, D] (already holding this token's key and value);
    positions [B, 1]. Returns [B, 1, KVH, G, D] in q's dtype.
    """
    mesh = _mesh.get()
    b, t, _, _, d = q.shape
    if mesh is None or t != 1 or b > MAX_ROWS or not decode_attention.supported(k_cache.shape[2], d):
        return None
    hi = positions[:, 0] + 1
    lo = jnp.zeros_like(hi) if window is None else jnp.maximum(hi - window, 0)

    def local(q, k_cache, v_cache, lo, hi):
        return decode_attention.attend(q[:, 0], k_cache, v_cache, lo, hi).astype(q.dtype)[:, None]

    q_spec = P(None, None, *cache_spec[1:2], None, None)
    out = _sharded(local, mesh, (q_spec, cache_spec, cache_spec, P(), P()), q_spec)
    return out(q, k_cache, v_cache, lo, hi)
