"""When the decode step uses the Pallas decode kernel, and how it runs on sharded arrays.

kernels/decode_attention.py replaces XLA's kernels for one step of attention (rotary embedding,
cache write, attention over the live positions) when each row brings one new token. A Pallas
call is opaque to XLA's SPMD partitioner (it would gather its operands to every device), so with
tp > 1 it runs under `shard_map` on the device's own heads, as sharding.py's specs say.

Measured on Llama-2-7B, ctx 1024, 2x H200 (scripts/gpu/NOTES.md, session 5), ms/token against
XLA's kernels: tp 1 batch 1 3.99 vs 4.28, batch 32 8.39 vs 9.08; tp 2 batch 1 3.11 vs 3.37,
batch 32 5.64 vs 5.93; the splits merged in the kernel instead of by XLA, tp 1 batch 1 3.83 vs
3.92 (one H200, session 6); qkv's split-K partials summed in the kernel (`qkv_splits`), 3.78 vs
3.81 (session 7). (A Pallas GEMV for the projections lost to XLA's GEMMs at every
tiling tried, session 4; a Pallas kernel for the split-K sum, residual add and RMSNorm after
o_proj / down_proj lost to XLA's two kernels, session 6; so did extra programs in this kernel
prefetching o_proj's weight into L2, session 7.)

Modes (`jaxtp.load(..., kernels=...)`, stored on the Model, static in the jitted steps):

  "xla"     XLA's own kernels everywhere.
  "pallas"  the Pallas kernel for decode steps where the shapes allow (head_dim 32-256, see
            decode_attention.supported), XLA's elsewhere (prefill). Off GPUs it runs in Pallas
            interpret mode: slow, but the same code, which is how the CPU tests check it
            against transformers.
  "auto"    "pallas" on GPUs with pipeline_parallel_size = data_parallel_size = 1, else "xla".
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxtp.kernels import decode_attention
from jaxtp.sharding import KV_CACHE_SPEC, QKV_SPEC

MODES = ("auto", "xla", "pallas")
QKV_SPLIT = 4        # qkv_splits: XLA's own split-K choice for Llama-2-7B's qkv at batch 1
QKV_SPLIT_ROWS = 8   # ... used for decode steps of up to this many rows

@dataclasses.dataclass
class _Step:
    """One traced step's use of the kernel: the mesh, and the arrival counters the kernel hands
    back zeroed, passed from layer to layer (one zeroed array per step, not one per layer)."""
    mesh: Mesh
    counters: jax.Array | None = None


_step: contextvars.ContextVar[_Step | None] = contextvars.ContextVar("decode_kernels", default=None)


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
    token = _step.set(_Step(mesh) if mode == "pallas" else None)
    try:
        yield
    finally:
        _step.reset(token)


def _sharded(fn, mesh: Mesh, in_specs, out_specs):
    if mesh.shape["tp"] == 1:
        return fn  # one device holds everything: no partitioning needed
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def applies(k_cache, positions) -> bool:
    """Whether `attention` runs this step in the kernel (else it returns None)."""
    return (_step.get() is not None and positions.shape[1] == 1
            and decode_attention.supported(k_cache.shape[2], k_cache.shape[3]))


def qkv_splits(rows: int, d_model: int, k_cache, positions) -> int | None:
    """How many ways QKVLinear should split its contraction for `attention` to sum (float32
    partials [S, ...]), or None: the qkv projection's own output then. XLA runs small-row
    projections as split-K GEMMs with a reduction kernel after; the decode kernel adds the
    partials itself instead (one kernel fewer per layer)."""
    if rows > QKV_SPLIT_ROWS or d_model % (QKV_SPLIT * 16) or not applies(k_cache, positions):
        return None
    return QKV_SPLIT


def attention(qkv, cos, sin, k_cache, v_cache, positions, window: int | None, num_heads: int):
    """One decode step of attention (rope, cache write, attention) in the Pallas kernel, or None
    where it does not apply (then XLA's kernels run).

    qkv [R, 1, tp, q|k|v heads per device, D] (QKVLinear's output; R may count padding rows past
    the B = positions.shape[0] real ones), or float32 [S, R, ...] split-K partials (qkv_splits);
    cos, sin [B, 1, D]; caches [B, KVH, S, D];
    positions [B, 1]. Returns (out [R, 1, KVH, G, D] in the caches' dtype, padding rows zero,
    k_cache, v_cache).
    """
    if not applies(k_cache, positions):
        return None
    step, d = _step.get(), k_cache.shape[3]
    mesh, pos = step.mesh, positions[:, 0]
    lo = jnp.zeros_like(pos) if window is None else jnp.maximum(pos + 1 - window, 0)
    heads = num_heads // mesh.shape["tp"]
    if step.counters is None:
        step.counters = jnp.zeros(k_cache.shape[:2], jnp.int32)

    split = qkv.ndim == 6  # [S, R, 1, tp, heads, D] partials

    def local(qkv, cos, sin, k_cache, v_cache, pos, lo, counters):
        out, k_cache, v_cache, counters = decode_attention.attend(
            qkv.reshape(*qkv.shape[:split + 1], -1, d), cos, sin, k_cache, v_cache, pos, lo, heads, counters)
        return out[:, None], k_cache, v_cache, counters

    out_spec, counter_spec = P(None, None, KV_CACHE_SPEC[1], None, None), P(*KV_CACHE_SPEC[:2])
    qkv_spec = P(None, *QKV_SPEC) if split else QKV_SPEC
    run = _sharded(local, mesh, (qkv_spec, P(), P(), KV_CACHE_SPEC, KV_CACHE_SPEC, P(), P(), counter_spec),
                   (out_spec, KV_CACHE_SPEC, KV_CACHE_SPEC, counter_spec))
    out, k_cache, v_cache, step.counters = run(qkv, cos[:, 0], sin[:, 0], k_cache, v_cache, pos, lo,
                                               step.counters)
    return out, k_cache, v_cache
