"""When a decode step's attention runs in the Pallas kernel, and how it runs on sharded arrays.

kernels/decode_attention.py does one step of attention (rotary embedding, cache write, attention
over the live positions) when each row brings one new token; kernels/prefill_attention.py is
flash attention of prefill chunks over the pages. Elsewhere the model's XLA path runs. A Pallas
call is opaque to XLA's SPMD partitioner (it would gather its operands to every device), so
with tp > 1 it runs under `shard_map` on the device's own heads, as sharding.py's specs say.

Modes (`jaxtp.load(..., kernels=...)`, kept in the model's OpsConfig):

  "xla"     XLA's own kernels everywhere.
  "pallas"  the Pallas kernels for decode steps and prefill chunks where the shapes allow
            (head_dim 32-256, pages of 16-256 tokens), XLA's elsewhere. Off GPUs it runs in Pallas
            interpret mode: slow, but the same code, which is how the CPU tests check it
            against transformers.
  "auto"    "pallas" on GPUs with pipeline_parallel_size = data_parallel_size = 1, else "xla".
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxtp.ops.kernels import decode_attention, prefill_attention
from jaxtp.sharding import HEADS_SPEC, KV_CACHE_SPEC, QKV_SPEC

if TYPE_CHECKING:
    from jaxtp.ops import OpsConfig

MODES = ("auto", "xla", "pallas")
QKV_SPLIT = 4        # qkv_splits: XLA's own split-K choice for a 4096-wide qkv at a few rows
QKV_SPLIT_ROWS = 8   # ... used for decode steps of up to this many rows


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


def _sharded(fn, mesh: Mesh, in_specs, out_specs):
    if mesh.shape["tp"] == 1:
        return fn  # one device holds everything: no partitioning needed
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def applies(ops: "OpsConfig | None", k_pages, positions) -> bool:
    """Whether `decode` runs this step in the kernel (else it returns None)."""
    return (ops is not None and ops.kernels == "pallas" and positions.shape[1] == 1
            and decode_attention.supported(k_pages.shape[2], k_pages.shape[3]))


def qkv_splits(ops: "OpsConfig | None", rows: int, d_model: int, k_pages, positions) -> int | None:
    """How many ways QKVLinear should split its contraction for `decode` to sum (float32
    partials [S, ...]), or None: the qkv projection's own output then. XLA runs small-row
    projections as split-K GEMMs with a reduction kernel after; the decode kernel adds the
    partials itself instead (one kernel fewer per layer)."""
    if rows > QKV_SPLIT_ROWS or d_model % (QKV_SPLIT * 16) or not applies(ops, k_pages, positions):
        return None
    return QKV_SPLIT


def decode(ops: "OpsConfig | None", qkv, cos, sin, k_pages, v_pages, positions, table, window: int | None,
           num_heads: int, dtype, counters=None):
    """One decode step of attention (rope, cache write, attention) in the Pallas kernel, or None
    where it does not apply (then XLA's kernels run).

    qkv [R, 1, tp, q|k|v heads per device, D] (QKVLinear's output; R may count padding rows past
    the B = positions.shape[0] real ones), or float32 [S, R, ...] split-K partials (qkv_splits);
    cos, sin [B, 1, D]; pages as kv_cache lays them out; positions [B, 1]; table [B, W] (the block
    tables); counters: the kernel's arrival counters as the previous layer handed them back
    (None: fresh zeros); dtype: the activations'. Returns (out [R, 1, KVH, G, D] in it, padding rows zero,
    k_pages, v_pages, counters) for the next layer to take.
    """
    if not applies(ops, k_pages, positions):
        return None
    d, mesh, pos = k_pages.shape[3], ops.mesh, positions[:, 0]
    lo = jnp.zeros_like(pos) if window is None else jnp.maximum(pos + 1 - window, 0)
    heads = num_heads // mesh.shape["tp"]
    if counters is None:
        counters = jnp.zeros((pos.shape[0], k_pages.shape[1]), jnp.int32)
    split = qkv.ndim == 6  # [S, R, 1, tp, heads, D] partials

    def local(qkv, cos, sin, k_pages, v_pages, table, pos, lo, counters):
        out, k_pages, v_pages, counters = decode_attention.attend(
            qkv.reshape(*qkv.shape[:split + 1], -1, d), cos, sin, k_pages, v_pages, table, pos, lo, heads,
            counters, dtype, ops.decode)
        return out[:, None], k_pages, v_pages, counters

    out_spec, counter_spec = P(None, None, KV_CACHE_SPEC[1], None, None), P(*KV_CACHE_SPEC[:2])
    qkv_spec = P(None, *QKV_SPEC) if split else QKV_SPEC
    run = _sharded(local, mesh, (qkv_spec, P(), P(), KV_CACHE_SPEC, KV_CACHE_SPEC, P(), P(), P(), counter_spec),
                   (out_spec, KV_CACHE_SPEC, KV_CACHE_SPEC, counter_spec))
    return run(qkv, cos[:, 0], sin[:, 0], k_pages, v_pages, table, pos, lo, counters)


def prefill(ops: "OpsConfig | None", q, k_pages, v_pages, table, starts, window: int | None):
    """Flash attention of prefill chunks q [B, T, H, D] (rotated, at positions starts[b] + t)
    over the pages their keys and values are already in, in the Pallas kernel -> [B, T, H, D];
    or None where it does not apply (then XLA's attention runs)."""
    t = q.shape[1]
    if (ops is None or ops.kernels != "pallas" or t == 1 or t & (t - 1)  # the engine's chunks: powers of 2
            or not decode_attention.supported(k_pages.shape[2], k_pages.shape[3])):
        return None
    run = _sharded(lambda *a: prefill_attention.attend(*a, window=window), ops.mesh,
                   (HEADS_SPEC, KV_CACHE_SPEC, KV_CACHE_SPEC, P(), P()), HEADS_SPEC)
    return run(q, k_pages, v_pages, table, starts)
