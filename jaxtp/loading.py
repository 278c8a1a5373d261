"""Hugging Face checkpoints -> sharded nnx state, tensor by tensor.

Each tensor is read from safetensors (memory-mapped), reshaped to jaxtp's layout ([in, out],
KV heads replicated up to tp, vocab padded) as a lazy numpy view, and handed to
`jax.make_array_from_callback`, which copies to each device only the slice it owns; in a
multi-process run it asks only for the slices of this process's devices. With pipeline stages,
a stacked layer parameter is read stage by stage, so a process reads only its stages' layers.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from tqdm.auto import tqdm

from jaxtp.config import ModelConfig
from jaxtp.model import CausalLM
from jaxtp.pipeline import PipelinedLM, stage_layer
from jaxtp.sharding import kv_heads_on_mesh, named, padded_vocab, pp_size, spec_for, tp_size

def resolve(path_or_id: str | Path) -> Path:
    """A local model directory, or a hub id looked up in (and if allowed, fetched into) the HF cache."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1:
        raise FileNotFoundError(f"model {str(path_or_id)!r} is neither a local directory nor a hub id "
                                f"like 'org/name'")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(path_or_id),
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    except Exception as e:  # offline, unknown repo, gated...
        raise FileNotFoundError(f"could not resolve hub id {str(path_or_id)!r}: {e}") from e


def tensor_index(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, for single-file and sharded (*.index.json) checkpoints."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights (pytorch .bin is not supported)")
    out = {}
    for file in files:
        with _open(file) as f:
            out.update({name: file for name in f.keys()})
    return out


def _read(name: str, index: dict, handles: dict, cfg: ModelConfig, path: Path) -> np.ndarray:
    """Read one HF tensor (memory-mapped), checking it against config.json."""
    if name not in index:
        raise KeyError(f"checkpoint {path} has no tensor {name!r}, which {cfg.architecture} "
                       f"with this config.json needs")
    file = index[name]
    if file not in handles:
        handles[file] = _open(file)
    try:
        w = handles[file].get_tensor(name)
    except Exception as e:
        raise ValueError(f"cannot read tensor {name!r} from {file}: {e}") from e
    want = hf_shape(name, cfg)
    if tuple(w.shape) != want:
        raise ValueError(f"tensor {name!r} in {file} has shape {tuple(w.shape)}, but config.json "
                         f"implies {want}")
    return w


def _open(file: Path):
    try:
        return safe_open(str(file), framework="np")
    except Exception as e:
        raise ValueError(f"cannot read safetensors file {file}: {e}") from e


# Fused parameters -> the HF tensors they are built from (vLLM's QKVParallelLinear and
# MergedColumnParallelLinear: one matmul instead of three / two, each device's slice contiguous).
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def sources(name: str) -> list[str]:
    """HF tensor names a jaxtp parameter is read from."""
    for fused, parts in FUSED.items():
        if f".{fused}." in name:
            return [name.replace(fused, part) for part in parts]
    return [name]


def hf_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The shape config.json implies for an HF tensor ([out, in] for linear weights)."""
    d, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    out = {"q_proj": cfg.num_heads * hd, "k_proj": cfg.num_kv_heads * hd, "v_proj": cfg.num_kv_heads * hd,
           "o_proj": d, "gate_proj": inter, "up_proj": inter, "down_proj": d}
    inp = {"o_proj": cfg.num_heads * hd, "down_proj": inter}
    module = name.split(".")[-2]
    if module in out:
        return (out[module],) if name.endswith("bias") else (out[module], inp.get(module, d))
    if module in ("embed_tokens", "lm_head"):
        return (cfg.vocab_size, d)
    return (hd,) if module in ("q_norm", "k_norm") else (d,)


def to_layout(name: str, w: np.ndarray, cfg: ModelConfig, tp: int) -> np.ndarray:
    """One HF tensor -> jaxtp layout: [in, out], KV heads replicated up to tp, vocab padded."""
    if name.endswith("_proj.weight") or name == "lm_head.weight":
        w = w.T
    if "k_proj" in name or "v_proj" in name:
        repeat = kv_heads_on_mesh(cfg, tp) // cfg.num_kv_heads
        if repeat > 1:  # KV-head replication: head h becomes heads h*r .. h*r + r-1
            lead = w.shape[:-1]
            w = np.repeat(w.reshape(*lead, cfg.num_kv_heads, cfg.head_dim), repeat, axis=-2)
            w = w.reshape(*lead, -1)
    pad = padded_vocab(cfg, tp) - cfg.vocab_size
    if pad and name.endswith("embed_tokens.weight"):
        w = np.pad(w, ((0, pad), (0, 0)))
    if pad and name == "lm_head.weight":
        w = np.pad(w, ((0, 0), (0, pad)))
    return w


def fuse(name: str, parts: list[np.ndarray], tp: int) -> np.ndarray:
    """Combine laid-out parts: qkv -> [..., tp, q_local|k_local|v_local]; gate_up -> [d, 2, I]."""
    if ".qkv_proj." in name:
        return np.concatenate([p.reshape(*p.shape[:-1], tp, -1) for p in parts], axis=-1)
    if ".gate_up_proj." in name:
        return np.stack(parts, axis=-2)
    return parts[0]


def abstract_model(cfg: ModelConfig, mesh, dtype) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and parameter shapes for this mesh, allocating nothing."""
    tp, pp = tp_size(mesh), pp_size(mesh)
    args = (cfg, kv_heads_on_mesh(cfg, tp), padded_vocab(cfg, tp), tp, dtype)
    return nnx.split(nnx.eval_shape(lambda: PipelinedLM(*args, pp=pp) if pp > 1 else CausalLM(*args)))


def random_state(cfg: ModelConfig, mesh, dtype, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """Random weights (std 0.02, norms 1) generated on device in their shardings: real shapes
    for benchmarks without a checkpoint on disk."""
    graphdef, state = abstract_model(cfg, mesh, dtype)
    flat = []
    for i, (key, var) in enumerate(nnx.to_flat_state(state)):
        name = ".".join(map(str, key))
        shape = var.get_value().shape

        def init(k, shape=shape, norm=name.endswith("norm.weight")):
            if norm:
                return jnp.ones(shape, dtype)
            return (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(dtype)

        sharding = named(mesh, spec_for(name, pp_size(mesh)))
        arr = jax.jit(init, out_shardings=sharding)(jax.random.key(seed * 100003 + i))
        flat.append((key, var.replace(arr)))
    return graphdef, nnx.from_flat_state(flat)


def load_state(path: Path, cfg: ModelConfig, mesh, dtype) -> tuple[nnx.GraphDef, nnx.State]:
    """Build the model abstractly and fill every parameter straight into its sharding."""
    tp, pp = tp_size(mesh), pp_size(mesh)
    graphdef, state = abstract_model(cfg, mesh, dtype)
    index = tensor_index(path)
    np_dtype = np.dtype(jnp.dtype(dtype))
    flat = []
    handles: dict[Path, object] = {}

    def read(name):
        parts = [to_layout(src, _read(src, index, handles, cfg, path), cfg, tp) for src in sources(name)]
        return fuse(name, parts, tp)

    def staged(name):  # a stacked layer parameter: idx[0] picks stages, read only those layers
        memo = {}

        def stage(s):
            if s not in memo:
                memo[s] = read(stage_layer(name, s, cfg.num_layers // pp))
            return memo[s]
        return lambda idx: np.stack([stage(s) for s in range(pp)[idx[0]]])[(slice(None), *idx[1:])]

    for key, var in tqdm(list(nnx.to_flat_state(state)), desc="loading weights", unit="tensor",
                         disable=None):
        name = ".".join(map(str, key))
        want = var.get_value().shape
        if pp > 1 and name.startswith("model.layers."):
            get = staged(name)
        else:
            w = read(name)
            assert w.shape == want, (name, w.shape, want)
            get = lambda idx, w=w: w[idx]  # noqa: E731
        arr = jax.make_array_from_callback(
            want, named(mesh, spec_for(name, pp)),
            lambda idx, get=get: np.ascontiguousarray(get(idx)).astype(np_dtype, copy=False))
        flat.append((key, var.replace(arr)))
    return graphdef, nnx.from_flat_state(flat)
