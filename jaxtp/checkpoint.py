"""Orbax save/restore of the sharded weights, restorable at any tp.

The saved arrays are tp-independent ("canonical"): q, k, v apart ([in, out], KV heads not
repeated) rather than the fused per-device qkv block, vocab unpadded. Restore reads each array
straight into a sharding on the target mesh (orbax/tensorstore read only each device's part;
the vocab padding is orbax's zero fill), then fuses q|k|v on device, one layer at a time.

A converted directory holds config.json, generation_config.json and the tokenizer files copied
from the HF checkpoint, `jaxtp_orbax.json` (the marker: format, dtype, every array's shape) and
`state/` (orbax). `jaxtp.load` recognises it by the marker.
"""
from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtp.config import ModelConfig
from jaxtp.loading import abstract_model, hf_shape
from jaxtp.sharding import kv_heads_on_mesh, spec_for, tp_size

MARKER = "jaxtp_orbax.json"
FORMAT = "jaxtp-orbax-v1"
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt", "README.md")


def is_orbax_dir(path: Path) -> bool:
    return (path / MARKER).is_file()


def canonical_shapes(name: str, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tp-independent arrays saved for jaxtp parameter `name`."""
    if ".qkv_proj." in name:
        parts = [name.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj")]
        return {p: hf_shape(p, cfg)[::-1] for p in parts}  # [in, out] / bias [out]
    if name.endswith("embed_tokens.weight"):
        return {name: (cfg.vocab_size, cfg.hidden_size)}
    if name == "lm_head.weight":
        return {name: (cfg.hidden_size, cfg.vocab_size)}
    if ".gate_up_proj." in name:
        return {name: (cfg.hidden_size, 2, cfg.intermediate_size)}
    return {name: hf_shape(name, cfg)[::-1]}


def _fit(spec: P, shape, mesh) -> P:
    """spec with 'tp' dropped from any axis it does not divide (those arrays are small)."""
    tp = tp_size(mesh)
    return P(*[a if a is None or shape[i] % tp == 0 else None for i, a in enumerate(spec)])


def canonical_sharding(name: str, shape, mesh) -> NamedSharding:
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
        spec = P(None, "tp")
    elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
        spec = P("tp")
    else:
        spec = spec_for(name)
    return NamedSharding(mesh, _fit(spec, shape, mesh))


def split_qkv(w, cfg: ModelConfig, tp: int):
    """Fused [..., tp, q|k|v local] -> (q, k, v) as [..., heads * head_dim], KV heads unrepeated."""
    hd, r = cfg.head_dim, kv_heads_on_mesh(cfg, tp) // cfg.num_kv_heads
    nq, nk = cfg.num_heads // tp * hd, kv_heads_on_mesh(cfg, tp) // tp * hd
    lead = w.shape[:-2]
    q = w[..., :nq].reshape(*lead, -1)
    k, v = (w[..., a: a + nk].reshape(*lead, cfg.num_kv_heads, r, hd)[..., 0, :].reshape(*lead, -1)
            for a in (nq, nq + nk))
    return q, k, v


def fuse_qkv(q, k, v, cfg: ModelConfig, tp: int):
    """(q, k, v) [..., heads * head_dim] -> fused [..., tp, q|k|v local], KV heads repeated to tp."""
    hd, r = cfg.head_dim, kv_heads_on_mesh(cfg, tp) // cfg.num_kv_heads
    lead = q.shape[:-1]
    k, v = (jnp.repeat(x.reshape(*lead, cfg.num_kv_heads, hd), r, axis=-2).reshape(*lead, tp, -1)
            for x in (k, v))
    return jnp.concatenate([q.reshape(*lead, tp, -1), k, v], axis=-1)


@functools.lru_cache(maxsize=None)
def _jit(kind: str, cfg: ModelConfig, tp: int, out_shardings, shape: tuple = ()):
    """One compiled re-layout per (kind, shardings, shape), shared by all layers."""
    fn = {"split": lambda w: split_qkv(w, cfg, tp), "fuse": lambda q, k, v: fuse_qkv(q, k, v, cfg, tp),
          "unpad": lambda w: w[tuple(slice(0, x) for x in shape)]}[kind]
    return jax.jit(fn, out_shardings=out_shardings)


def save(params: nnx.State, cfg: ModelConfig, mesh, src: Path, out: Path, dtype: str) -> None:
    """Write the canonical arrays of a loaded model with orbax, plus config/tokenizer files and
    the marker. Each parameter is deleted once its canonical copy exists, so device memory
    stays near one model (the params are unusable afterwards)."""
    import orbax.checkpoint as ocp
    tp = tp_size(mesh)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    tree = {}
    for key, var in nnx.to_flat_state(params):
        name, arr = ".".join(map(str, key)), var.get_value()
        shapes = canonical_shapes(name, cfg)
        outs = {n: canonical_sharding(n, s, mesh) for n, s in shapes.items()}
        if ".qkv_proj." in name:
            tree.update(zip(shapes, _jit("split", cfg, tp, tuple(outs.values()))(arr)))
        elif (n := name) and shapes[n] == arr.shape:
            tree[n] = arr
            continue
        else:  # the vocab padding cut off
            tree[n] = _jit("unpad", cfg, tp, outs[n], shapes[n])(arr)
        arr.delete()
    out.mkdir(parents=True, exist_ok=True)
    ocp.PyTreeCheckpointer().save((out / "state").absolute(), args=ocp.args.PyTreeSave(tree))
    for f in COPIED:
        if (src / f).is_file():
            shutil.copy(src / f, out / f)
    (out / MARKER).write_text(json.dumps(
        {"format": FORMAT, "dtype": dtype, "tp_saved": tp,
         "arrays": {n: list(a.shape) for n, a in tree.items()}}, indent=1))


def read_marker(path: Path) -> dict:
    try:
        marker = json.loads((path / MARKER).read_text())
        if marker.get("format") != FORMAT:
            raise ValueError(f"format {marker.get('format')!r}, expected {FORMAT!r}")
        marker["arrays"] = {n: tuple(s) for n, s in marker["arrays"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path / MARKER} is not a valid jaxtp orbax marker: {e}") from e
    if not (path / "state").is_dir():
        raise ValueError(f"orbax checkpoint {path} has no state/ directory (incomplete conversion?)")
    return marker


def restore(path: Path, cfg: ModelConfig, mesh, dtype) -> tuple[nnx.GraphDef, nnx.State]:
    """Restore a converted directory at this mesh's tp (any tp config.json allows)."""
    import orbax.checkpoint as ocp
    tp = tp_size(mesh)
    saved = read_marker(path)["arrays"]
    graphdef, state = abstract_model(cfg, mesh, dtype)
    flat_state = nnx.to_flat_state(state)
    names = [".".join(map(str, key)) for key, _ in flat_state]
    want = {n: s for name in names for n, s in canonical_shapes(name, cfg).items()}
    for n, s in want.items():
        if n not in saved:
            raise KeyError(f"orbax checkpoint {path} has no array {n!r}, which {cfg.architecture} with "
                           f"this config.json needs")
        if saved[n] != s:
            raise ValueError(f"array {n!r} in orbax checkpoint {path} has shape {saved[n]}, but "
                             f"config.json implies {s}")
    extra = sorted(set(saved) - set(want))
    if extra:
        raise ValueError(f"orbax checkpoint {path} has array(s) this config.json does not use: "
                         f"{', '.join(map(repr, extra[:5]))}")
    args = {}
    for name, (_, var) in zip(names, flat_state):
        for n, s in canonical_shapes(name, cfg).items():
            if ".qkv_proj." in name:
                args[n] = ocp.ArrayRestoreArgs(sharding=canonical_sharding(n, s, mesh), dtype=dtype)
            else:  # straight into the parameter's sharding; vocab padding is orbax's zero fill
                args[n] = ocp.ArrayRestoreArgs(sharding=NamedSharding(mesh, spec_for(name)),
                                               global_shape=var.get_value().shape, strict=False,
                                               dtype=dtype)
    try:
        tree = ocp.PyTreeCheckpointer().restore((path / "state").absolute(),
                                                args=ocp.args.PyTreeRestore(restore_args=args))
    except Exception as e:  # tensorstore / orbax errors: say which checkpoint and array, keep the detail
        bad = [n for n in args if re.search(rf"(?<![\w.]){re.escape(n)}/", str(e))]
        raise ValueError(f"cannot restore orbax checkpoint {path}"
                         f"{f' (array {bad[0]!r})' if bad else ''}: {type(e).__name__}: {e}") from e
    flat = []
    for name, (key, var) in zip(names, flat_state):
        target = NamedSharding(mesh, spec_for(name))
        if ".qkv_proj." in name:
            parts = [tree.pop(n) for n in canonical_shapes(name, cfg)]
            arr = _jit("fuse", cfg, tp, target)(*parts)
            del parts
        else:
            arr = tree.pop(name)
        flat.append((key, var.replace(arr)))
    return graphdef, nnx.from_flat_state(flat)
