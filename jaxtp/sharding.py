"""Where every weight is split: the device mesh and the ONE table of partition rules.

Megatron-style tensor parallelism expressed as shardings; XLA's SPMD partitioner inserts the
collectives. Weights are stored [in, out] (x @ W):

* column-split (output features over `tp`): q/k/v, gate, up -> each device owns whole heads /
  a slice of the MLP, no communication on the way in. q/k/v are fused into one matmul and
  gate/up into another (as vLLM does); their parameters carry an explicit axis so that each
  device's slice is its own [q|k|v] or [gate|up] block;
* row-split (input features over `tp`): o, down -> partial sums, one all-reduce per block;
* vocab-split: embedding rows and LM-head columns.

When tp > num_kv_heads the loader repeats each KV head tp/num_kv_heads times (vLLM's KV-head
replication), so every device owns exactly one KV head and the cache still splits on heads.
"""
from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxtp.config import ModelConfig

# Parameter path (as in the HF checkpoint) -> PartitionSpec of the [in, out] weight.
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens\.weight$", P("tp", None)),                 # vocab-split rows
    (r"qkv_proj\.weight$", P(None, "tp", None)),               # column-split [d, tp, q|k|v local]
    (r"qkv_proj\.bias$", P("tp", None)),
    (r"gate_up_proj\.weight$", P(None, None, "tp")),           # column-split [d, gate|up, I]
    (r"(o_proj|down_proj)\.weight$", P("tp", None)),           # row-split
    (r"lm_head\.weight$", P(None, "tp")),                      # vocab-split columns
    (r"norm\.weight$", P()),                                   # all norms: replicated
)

# Activations and cache.
KV_CACHE_SPEC = P("dp", "tp", None, None)   # [batch, kv_heads, seq, head_dim]
HEADS_SPEC = P("dp", None, "tp", None)      # [batch, seq, heads, head_dim]
REPLICATED = P()


def spec_for(path: str) -> P:
    """PartitionSpec for a parameter path like 'model.layers.3.self_attn.q_proj.weight'."""
    for pattern, spec in PARTITION_RULES:
        if re.search(pattern, path):
            return spec
    raise KeyError(f"no partition rule matches parameter {path!r}")


def make_mesh(tp: int = 1, dp: int = 1, devices=None) -> Mesh:
    """A ('dp', 'tp') mesh over the first dp*tp devices; tp is the fastest-varying axis so a
    tensor-parallel group sits on neighbouring (NVLink-connected) devices."""
    devices = list(devices if devices is not None else jax.devices())
    if tp < 1 or dp < 1:
        raise ValueError(f"tp and dp must be >= 1, got tp={tp}, dp={dp}")
    if dp * tp > len(devices):
        kind = devices[0].platform if devices else "none"
        hint = (f"; on a CPU-only machine set XLA_FLAGS=--xla_force_host_platform_device_count={dp * tp}"
                " before jax is imported" if kind == "cpu" else "")
        raise ValueError(f"tensor_parallel_size={tp} x data_parallel_size={dp} needs {dp * tp} devices, "
                         f"but only {len(devices)} {kind} device(s) are visible{hint}")
    return Mesh(np.array(devices[: dp * tp]).reshape(dp, tp), ("dp", "tp"))


def tp_size(mesh: Mesh) -> int:
    return mesh.shape["tp"]


def kv_heads_on_mesh(cfg: ModelConfig, tp: int) -> int:
    """Number of KV heads the sharded model holds: replicated up to tp when tp > num_kv_heads."""
    return max(cfg.num_kv_heads, tp)


def padded_vocab(cfg: ModelConfig, tp: int) -> int:
    """Vocab padded to a multiple of 128 * tp so each shard is lane-aligned; extra logits are masked."""
    multiple = 128 * tp
    return -(-cfg.vocab_size // multiple) * multiple


def validate_tp(cfg: ModelConfig, tp: int) -> None:
    """Raise a clear error (as vLLM does) when tp cannot split this model."""
    if cfg.num_heads % tp:
        raise ValueError(f"Total number of attention heads ({cfg.num_heads}) must be divisible by "
                         f"tensor parallel size ({tp}).")
    kv = cfg.num_kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise ValueError(f"Number of key/value heads ({kv}) must be divisible by tensor parallel size "
                         f"({tp}), or tensor parallel size by it (KV heads are then replicated).")
    if cfg.intermediate_size % tp:
        raise ValueError(f"intermediate_size ({cfg.intermediate_size}) must be divisible by tensor "
                         f"parallel size ({tp}).")


def named(mesh: Mesh, spec: P) -> NamedSharding:
    return NamedSharding(mesh, spec)
