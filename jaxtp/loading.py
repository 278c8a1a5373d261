"""Hugging Face checkpoints -> sharded nnx state, tensor by tensor.

Each HF tensor is memory-mapped on its own (safetensors_io), and `jax.make_array_from_callback`
asks for each device's slice of the jaxtp parameter in HF orientation; `param_slice` reads just
the HF rows behind that slice (KV heads replicated up to tp, vocab padded, q|k|v and gate|up
fused) in one copy, and the device transposes to jaxtp's [in, out]. Nothing model-sized is ever
built on the host: peak host memory stays near the largest tensor. The map is dropped after each
tensor so its pages leave the process. In a multi-process run only this process's devices'
slices are asked for; with pipeline stages a stacked layer parameter is read stage by stage, so a
process reads only its stages' layers.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jaxtp import int4, safetensors_io as st
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


def out_map(name: str, cfg: ModelConfig, tp: int) -> np.ndarray:
    """For an HF tensor, the HF row (output feature) behind each position of jaxtp's output axis:
    KV heads repeated up to tp, vocab padded with -1 (zeros)."""
    module = name.split(".")[-2]
    n = hf_shape(name, cfg)[0]
    if module in ("k_proj", "v_proj"):
        heads = np.repeat(np.arange(cfg.num_kv_heads), kv_heads_on_mesh(cfg, tp) // cfg.num_kv_heads)
        return (heads[:, None] * cfg.head_dim + np.arange(cfg.head_dim)).reshape(-1)
    if module in ("embed_tokens", "lm_head"):
        return np.concatenate([np.arange(n), np.full(padded_vocab(cfg, tp) - n, -1)])
    return np.arange(n)


def gather(src: np.ndarray, rows: np.ndarray, cols: slice | None, dtype, scale: np.ndarray | None = None
           ) -> np.ndarray:
    """src[rows, cols] (row -1 -> zeros) as a fresh array of `dtype`, each row times scale[row]
    if given (a pre-quantized weight). Runs of consecutive rows are copied as slices, so only
    their bytes of the mmap are read, cast in that same copy."""
    sub = src[:, cols] if src.ndim == 2 else src
    out = np.zeros((len(rows), *sub.shape[1:]), dtype)
    br = np.flatnonzero((np.diff(rows) != 1) & ~((rows[:-1] < 0) & (rows[1:] < 0))) + 1
    for i, j in zip([0, *br], [*br, len(rows)]):
        if rows[i] >= 0:
            run = sub[rows[i]: rows[i] + j - i]
            out[i:j] = run if scale is None else run.astype(np.float32) * scale[rows[i]: rows[i] + j - i, None]
    return out


def scale_name(weight: str) -> str:
    """A pre-quantized weight's scale tensor: per tensor ([] or [1]) or per row ([out, 1])."""
    return weight.removesuffix(".weight") + ".weight_scale"


def row_scales(tensors: dict[str, st.TensorInfo], names: list[str]) -> dict[str, np.ndarray]:
    """For the fp8 weights among `names`, their scale for each row (output feature), float32."""
    out = {}
    for name in names:
        info = tensors.get(scale_name(name))
        if info is not None:
            rows = tensors[name].shape[0]
            out[name] = np.broadcast_to(np.asarray(info.mmap(), np.float32).reshape(-1, 1)[:, 0], (rows,)).copy()
    return out


def hf_order(name: str, ndim: int) -> tuple[int, ...]:
    """The axis permutation taking a parameter from HF orientation (output features before input
    features) to jaxtp's layout. The host reads in HF orientation, where each device's slice is
    whole rows of the file (a plain copy); the device transposes, far faster than numpy."""
    if name.endswith("_proj.weight") or name == "lm_head.weight":
        return (1, 0) if ndim == 2 else (2, 0, 1)  # [out, in] -> [in, out]; [tp|2, w, d] -> [d, tp|2, w]
    return tuple(range(ndim))


def param_slice(name: str, idx: tuple, srcs: dict[str, np.ndarray], cfg: ModelConfig, tp: int,
                dtype, scales: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Device slice `idx` of jaxtp parameter `name` in HF orientation (see hf_order), read from
    its memory-mapped HF tensors: qkv_proj [tp, q|k|v of that device, d] (bias [tp, q|k|v]),
    gate_up_proj [2, I, d], other linear weights [out, in], embedding [vocab, d], norms [d].
    `scales`: the row scales of pre-quantized sources, applied as they are read."""
    parts, scales = sources(name), scales or {}
    if ".qkv_proj." in name:
        p_sl, w_sl, *cols = idx
        return np.stack([np.concatenate([gather(srcs[s], out_map(s, cfg, tp).reshape(tp, -1)[p],
                                                *(cols or [None]), dtype, scales.get(s)) for s in parts])[w_sl]
                         for p in range(tp)[p_sl]])
    if ".gate_up_proj." in name:
        k_sl, i_sl, d_sl = idx
        return np.stack([gather(srcs[s], out_map(s, cfg, tp)[i_sl], d_sl, dtype, scales.get(s))
                         for s in np.array(parts)[k_sl]])
    (src,) = parts
    return gather(srcs[src], out_map(src, cfg, tp)[idx[0]], idx[1] if len(idx) > 1 else None, dtype,
                  scales.get(src))


@functools.lru_cache(maxsize=None)
def _permute(order: tuple[int, ...], sharding):
    return jax.jit(lambda x: jnp.transpose(x, order), out_shardings=sharding)


def abstract_model(cfg: ModelConfig, mesh, dtype) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and parameter shapes for this mesh, allocating nothing."""
    tp, pp = tp_size(mesh), pp_size(mesh)
    args = (cfg, kv_heads_on_mesh(cfg, tp), padded_vocab(cfg, tp), tp, dtype)
    return nnx.split(nnx.eval_shape(lambda: PipelinedLM(*args, pp=pp) if pp > 1 else CausalLM(*args)))


def param_shapes(cfg: ModelConfig, mesh, dtype) -> dict[str, tuple[tuple[int, ...], object]]:
    """Parameter name -> (shape, sharding) on this mesh, allocating nothing."""
    _, state = abstract_model(cfg, mesh, dtype)
    pp = pp_size(mesh)
    return {".".join(map(str, k)): (v.get_value().shape, named(mesh, spec_for(".".join(map(str, k)), pp)))
            for k, v in nnx.to_flat_state(state)}


def random_state(cfg: ModelConfig, mesh, dtype, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """Random weights (std 0.02, norms 1) generated on device in their shardings: real shapes
    for benchmarks without a checkpoint on disk."""
    graphdef, state = abstract_model(cfg, mesh, dtype)
    flat = []
    for i, (key, var) in enumerate(nnx.to_flat_state(state)):
        name = ".".join(map(str, key))
        sharding = named(mesh, spec_for(name, pp_size(mesh)))
        arr = _random_array(jax.random.key(seed * 100003 + i), var.get_value().shape, dtype,
                            name.endswith("norm.weight"), sharding)
        flat.append((key, var.replace(arr)))
    return graphdef, nnx.from_flat_state(flat)


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "norm", "sharding"))
def _random_array(key, shape, dtype, norm, sharding):
    """One compile per distinct (shape, sharding), not per parameter (a 7B model has ~300)."""
    x = jnp.ones(shape, dtype) if norm else (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)
    return jax.lax.with_sharding_constraint(x, sharding)


IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # buffers some older checkpoints carry


def check_tensors(tensors: dict[str, st.TensorInfo], needed: list[str], cfg: ModelConfig,
                  path: Path) -> None:
    """Every tensor the model needs is there with config.json's shape and a float dtype, and
    nothing else is: a mismatched checkpoint fails before anything is loaded."""
    packed = [n for n in needed if is_packed(n, tensors, cfg)]
    for name in packed:
        check_packed(tensors, name, cfg)
    needed = [n for n in needed if n not in packed]
    for name in needed:
        if name not in tensors:
            raise KeyError(f"checkpoint {path} has no tensor {name!r}, which {cfg.architecture} "
                           f"with this config.json needs")
        t = tensors[name]
        if t.shape != hf_shape(name, cfg):
            raise ValueError(f"tensor {name!r} in {t.file} has shape {t.shape}, but config.json "
                             f"implies {hf_shape(name, cfg)}")
        t.dtype  # raises, naming tensor and file, for non-float tensors
    scales = [scale_name(n) for n in needed if scale_name(n) in tensors]
    for name in scales:
        scale, rows = tensors[name], hf_shape(name.removesuffix("_scale"), cfg)[0]
        if scale.shape not in ((), (1,), (rows, 1)):
            raise ValueError(f"tensor {name!r} in {scale.file} has shape {scale.shape}: a weight scale is "
                             f"per tensor ([] or [1]) or per output feature ([{rows}, 1])")
    needed = needed + scales + [p for n in packed for p in packed_parts(n, cfg) if p in tensors]
    extra = [n for n in tensors if n not in set(needed) and not IGNORED.search(n)
             and not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    if extra:
        raise ValueError(f"checkpoint {path} has tensor(s) {cfg.architecture} with this config.json "
                         f"does not use: {', '.join(f'{n!r} (in {tensors[n].file.name})' for n in extra[:5])}"
                         f"{' ...' if len(extra) > 5 else ''}")


def is_packed(name: str, tensors: dict[str, st.TensorInfo], cfg: ModelConfig) -> bool:
    """Whether HF weight `name` is stored as a 4-bit AWQ / GPTQ group (int4.py)."""
    return (bool(cfg.packed_int4) and name not in tensors
            and name.removesuffix(".weight") + ".qweight" in tensors)


def packed_parts(name: str, cfg: ModelConfig) -> list[str]:
    return [f"{name.removesuffix('.weight')}.{p}" for p in int4.parts(cfg.packed_int4[0])]


def check_packed(tensors: dict[str, st.TensorInfo], name: str, cfg: ModelConfig) -> None:
    kind, group, _ = cfg.packed_int4
    for part, shape in zip(packed_parts(name, cfg), int4.shapes(kind, group, *hf_shape(name, cfg)).values()):
        if part not in tensors:
            if part.endswith(".g_idx"):
                continue  # optional: the groups are then in order
            raise KeyError(f"checkpoint has {name.removesuffix('.weight')}.qweight but no {part!r}")
        t = tensors[part]
        if t.shape != shape:
            raise ValueError(f"tensor {part!r} in {t.file} has shape {t.shape}, but config.json and the "
                             f"{kind} layout (group_size {group}) imply {shape}")
        t.dtype if part.endswith(".scales") else t.require_int32()  # raises, naming tensor and file


def source(tensors: dict[str, st.TensorInfo], name: str, cfg: ModelConfig) -> np.ndarray:
    """HF tensor `name` as an array: memory-mapped, or the float32 weight a 4-bit one stands for."""
    if not is_packed(name, tensors, cfg):
        return tensors[name].mmap()
    arrays = {p.rsplit(".", 1)[1]: tensors[p].mmap() if p.endswith(".scales") else tensors[p].mmap_int32()
              for p in packed_parts(name, cfg) if p in tensors}
    return int4.dense(arrays, *cfg.packed_int4)


def load_state(path: Path, cfg: ModelConfig, mesh, dtype) -> tuple[nnx.GraphDef, nnx.State]:
    """Build the model abstractly and fill every parameter straight into its sharding: each HF
    tensor is mapped once, each device's slice read from the map, then the map is dropped."""
    tp, pp = tp_size(mesh), pp_size(mesh)
    graphdef, state = abstract_model(cfg, mesh, dtype)
    flat_state = nnx.to_flat_state(state)
    names = [".".join(map(str, key)) for key, _ in flat_state]
    tensors = st.index(path)
    per_stage = cfg.num_layers // pp

    def layers(name):  # the per-layer parameter names behind a (possibly stage-stacked) one
        if pp > 1 and name.startswith("model.layers."):
            return [stage_layer(name, s, per_stage) for s in range(pp)]
        return [name]
    check_tensors(tensors, [s for n in names for h in layers(n) for s in sources(h)], cfg, path)
    np_dtype = np.dtype(jnp.dtype(dtype))
    flat = []
    for name, (key, var) in tqdm(list(zip(names, flat_state)), desc="loading weights", unit="tensor",
                                 disable=None):
        per_layer = layers(name)
        stacked = pp > 1 and name.startswith("model.layers.")
        srcs = {s: source(tensors, s, cfg) for h in per_layer for s in sources(h)}
        scales = row_scales(tensors, list(srcs))

        def read(idx, per_layer=per_layer, stacked=stacked, srcs=srcs, scales=scales):
            try:
                if not stacked:
                    return param_slice(per_layer[0], idx, srcs, cfg, tp, np_dtype, scales)
                return np.stack([param_slice(per_layer[s], idx[1:], srcs, cfg, tp, np_dtype, scales)
                                 for s in range(pp)[idx[0]]])
            except OSError as e:
                raise ValueError(f"cannot read {', '.join(map(repr, srcs))} from "
                                 f"{', '.join(sorted({str(tensors[s].file) for s in srcs}))}: {e}") from e

        shape, spec = var.get_value().shape, spec_for(name, pp)
        lead = int(stacked)  # the stage axis stays first
        order = (0,) * lead + tuple(o + lead for o in hf_order(name, len(shape) - lead))
        inverse = tuple(np.argsort(order))  # HF orientation = layout.transpose(inverse)
        spec = tuple(spec) + (None,) * (len(shape) - len(spec))
        arr = jax.make_array_from_callback(tuple(shape[i] for i in inverse),
                                           named(mesh, P(*(spec[i] for i in inverse))), read)
        if order != tuple(range(len(shape))):
            arr = _permute(order, named(mesh, spec_for(name, pp)))(arr)
        flat.append((key, var.replace(arr)))
        del srcs, read  # unmaps this tensor: its pages leave the process
    return graphdef, nnx.from_flat_state(flat)
