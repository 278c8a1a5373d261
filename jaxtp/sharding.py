"""Where every weight is split: the device mesh and the ONE table of partition rules.

Megatron-style tensor parallelism expressed as shardings; XLA's SPMD partitioner inserts the
collectives. Weights are stored [in, out] (x @ W), 8-bit ones of q|k|v and gate|up (and under
W8A8 of o and down) [out, in] as `weight_t` (quantize.py), split on the same features:

* column-split (output features over `tp`): q/k/v, gate, up -> each device owns whole heads /
  a slice of the MLP, no communication on the way in. q/k/v are fused into one matmul and
  gate/up into another (as vLLM does); their parameters carry an explicit axis so that each
  device's slice is its own [q|k|v] or [gate|up] block;
* row-split (input features over `tp`): o, down -> partial sums, one all-reduce per block;
* vocab-split: embedding rows and LM-head columns.

When tp > num_kv_heads the loader repeats each KV head tp/num_kv_heads times (vLLM's KV-head
replication), so every device owns exactly one KV head and the cache still splits on heads.

Data parallelism: weights are replicated over `dp`; per-row data (decode state, block tables,
sampling constants, prompts) is split on `dp` along the batch, and the KV pages along the pool
(each replica owns its pages and numbers them from 0). Pipeline parallelism: decoder
layers are stacked per stage on a leading `pp` axis (see pipeline.py); everything else is
replicated over `pp`.
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
    # int8 weight-only quantization (quantize.py): one scale per output channel, split as the
    # weight's output axis is
    (r"qkv_proj\.scale$", P("tp", None)),
    (r"qkv_proj\.weight_t$", P("tp", None, None)),            # 8-bit, stored [tp, q|k|v local, d]
    (r"gate_up_proj\.weight_t$", P(None, "tp", None)),        # 8-bit, stored [gate|up, I, d]
    (r"gate_up_proj\.scale$", P(None, "tp")),
    (r"(o_proj|down_proj)\.scale$", P()),
    (r"(o_proj|down_proj)\.weight_t$", P(None, "tp")),        # 8-bit, stored [out, in]
    (r"norm\.weight$", P()),                                   # all norms: replicated
)

# Activations, cache and per-row data.
KV_CACHE_SPEC = P("dp", "tp", None, None)   # [pages, kv_heads, ...]: pages per replica (engine.kv_cache)
STAGED_KV_CACHE_SPEC = P("pp", *KV_CACHE_SPEC)  # [stage, pages, kv_heads, ...]
ROWS_SPEC = P("dp")                         # [batch, ...]: one row per cache slot or prompt
QKV_SPEC = P("dp", None, "tp", None, None)  # [batch, seq, tp, q|k|v heads per device, head_dim]
HEADS_SPEC = P("dp", None, "tp", None)      # [batch, seq, heads, head_dim]: queries, attention out
REPLICATED = P()


def spec_for(path: str, pp: int = 1) -> P:
    """PartitionSpec for a parameter path like 'model.layers.3.self_attn.q_proj.weight'; with
    pp > 1 decoder-layer parameters carry a leading stage axis split on `pp`."""
    for pattern, spec in PARTITION_RULES:
        if re.search(pattern, path):
            return P("pp", *spec) if pp > 1 and path.startswith("model.layers.") else spec
    raise KeyError(f"no partition rule matches parameter {path!r}")


def make_mesh(tp: int = 1, dp: int = 1, devices=None, pp: int = 1) -> Mesh:
    """A ('pp', 'dp', 'tp') mesh over the first pp*dp*tp devices; tp is the fastest-varying axis
    so a tensor-parallel group sits on neighbouring (NVLink-connected, same-host) devices, and pp
    the slowest, so stages are what crosses hosts. A multi-process mesh must use every device."""
    devices = list(devices if devices is not None else jax.devices())
    if tp < 1 or dp < 1 or pp < 1:
        raise ValueError(f"tp, dp and pp must be >= 1, got tp={tp}, dp={dp}, pp={pp}")
    need = pp * dp * tp
    layout = f"tensor_parallel_size={tp} x data_parallel_size={dp} x pipeline_parallel_size={pp}"
    if need > len(devices):
        kind = devices[0].platform if devices else "none"
        hint = (f"; on a CPU-only machine set XLA_FLAGS=--xla_force_host_platform_device_count={need}"
                " before jax is imported" if kind == "cpu" else "")
        raise ValueError(f"{layout} needs {need} devices, but only {len(devices)} {kind} device(s) "
                         f"are visible{hint}")
    if jax.process_count() > 1 and need != len(devices):
        raise ValueError(f"{layout} = {need} devices, but a multi-process mesh must use all "
                         f"{len(devices)} devices of its {jax.process_count()} processes "
                         f"({jax.local_device_count()} each)")
    return Mesh(np.array(devices[:need]).reshape(pp, dp, tp), ("pp", "dp", "tp"))


def tp_size(mesh: Mesh) -> int:
    return mesh.shape["tp"]


def pp_size(mesh: Mesh) -> int:
    return mesh.shape.get("pp", 1)


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


def validate_pp(cfg: ModelConfig, pp: int) -> None:
    if cfg.num_layers % pp:
        raise ValueError(f"Number of hidden layers ({cfg.num_layers}) must be divisible by pipeline "
                         f"parallel size ({pp}).")


def named(mesh: Mesh, spec: P) -> NamedSharding:
    return NamedSharding(mesh, spec)
