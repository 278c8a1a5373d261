"""The device-memory budget: how many KV-cache tokens fit beside the weights (vLLM's
gpu_memory_utilization), decided before any weight is read so that a model that cannot fit
fails at load with the numbers, not later with an out-of-memory error from inside XLA.

Per device: budget = device memory x fraction - memory already in use - weight bytes; the KV
cache gets the budget, at 2 (k, v) x layers x local KV heads x head_dim x itemsize bytes per
token. The rest, (1 - fraction) of the device, is left for activations and XLA's workspace.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxtp.config import ModelConfig
from jaxtp.sharding import kv_heads_on_mesh


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device figures, in bytes, and the KV-cache capacity they give."""
    device_bytes: int         # memory of one device (bytes_limit, or the override)
    fraction: float           # of device_bytes that jaxtp may use
    in_use_bytes: int         # already allocated on the device before loading
    weight_bytes: int         # this model's weights on the fullest device
    kv_bytes_per_token: int   # one token's keys and values, all layers, on one device
    max_kv_tokens: int        # cache capacity of each dp replica: sum over rows of cached positions

    @property
    def kv_budget_bytes(self) -> int:
        return int(self.device_bytes * self.fraction) - self.in_use_bytes - self.weight_bytes

    def describe(self) -> str:
        return (f"{size(self.weight_bytes)} of weights per device, device memory "
                f"{size(self.device_bytes)} x memory_fraction {self.fraction} = "
                f"{size(int(self.device_bytes * self.fraction))}, {size(self.in_use_bytes)} already in use, "
                f"leaving {size(self.kv_budget_bytes)} for the KV cache at {self.kv_bytes_per_token} "
                f"bytes per token")


def size(n: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def device_memory(mesh: Mesh) -> tuple[int, int]:
    """(memory of a device, bytes in use on it), for the mesh's tightest device. CPU devices
    report no stats: simulated devices share the host's RAM, so each gets an equal part of
    what is available. In a multi-process run every process gets the tightest figure of all
    processes, so all of them size the same cache (and compile the same programs)."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    stats = [d.memory_stats() for d in local]
    if all(s and "bytes_limit" in s for s in stats):
        s = min(stats, key=lambda s: s["bytes_limit"] - s.get("bytes_in_use", 0))
        mine = (int(s["bytes_limit"]), int(s.get("bytes_in_use", 0)))
    else:
        mine = (host_available() // len(local), 0)
    if jax.process_count() == 1:
        return mine
    from jax.experimental import multihost_utils
    mib = np.array([mine[0] // 2**20, -(-mine[1] // 2**20)], np.int32)  # jax ints are 32-bit
    every = np.asarray(multihost_utils.process_allgather(mib)).reshape(-1, 2).tolist()
    limit, in_use = min(every, key=lambda x: x[0] - x[1])
    return limit * 2**20, in_use * 2**20


def host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def weight_bytes(shapes: dict[str, tuple[tuple[int, ...], NamedSharding]], dtype) -> int:
    """Bytes of the given (shape, sharding) parameters on the fullest device, without allocating."""
    per_device: dict = {}
    item = np.dtype(dtype).itemsize
    for shape, sharding in shapes.values():
        nbytes = int(np.prod(sharding.shard_shape(shape))) * item
        for d in sharding.addressable_devices:
            per_device[d] = per_device.get(d, 0) + nbytes
    return max(per_device.values(), default=0)


def array_bytes(tree) -> int:
    """Bytes of the arrays in `tree` on the fullest of this process's devices."""
    per_device: dict = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)


def kv_bytes_per_token(cfg: ModelConfig, tp: int, dtype, pp: int = 1) -> int:
    """One cached token on one device: k and v, the device's stage's layers (all, without pp),
    the device's share of KV heads."""
    return (2 * (cfg.num_layers // pp) * (kv_heads_on_mesh(cfg, tp) // tp) * cfg.head_dim
            * np.dtype(dtype).itemsize)


def plan(cfg: ModelConfig, tp: int, kv_dtype, weights: int, fraction: float, mesh: Mesh,
         device_bytes: int | None = None) -> MemoryPlan:
    """Size the KV cache, or raise a ValueError with the numbers if the model or one full-length
    sequence (max_position_embeddings tokens) does not fit. device_bytes overrides the device's
    own figure (CPU has none; tests use it to simulate a small GPU)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {fraction!r}")
    limit, in_use = device_memory(mesh)
    if device_bytes is not None:
        limit, in_use = int(device_bytes), 0
    per_token = kv_bytes_per_token(cfg, tp, kv_dtype, mesh.shape.get("pp", 1))
    p = MemoryPlan(limit, fraction, in_use, weights, per_token, 0)
    if p.kv_budget_bytes <= 0:
        raise ValueError(f"the model does not fit: {p.describe()}. Use a larger tp, a smaller dtype "
                         f"or a larger memory_fraction.")
    p = dataclasses.replace(p, max_kv_tokens=p.kv_budget_bytes // per_token)
    if p.max_kv_tokens < cfg.max_position_embeddings:
        raise ValueError(f"the KV cache cannot hold one sequence of max_position_embeddings="
                         f"{cfg.max_position_embeddings} tokens ({cfg.max_position_embeddings * per_token} "
                         f"bytes per device): {p.describe()}, room for {p.max_kv_tokens} tokens. Use a "
                         f"larger tp or memory_fraction.")
    return p
