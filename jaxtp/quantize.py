"""int8 weight-only quantization (an option: `jaxtp.load(..., quantization="int8")`).

Decode reads every weight once per token, so halving weight bytes is the largest lever left
once a step is bandwidth-bound. The four projection weights of every layer (q|k|v, o,
gate|up, down) become int8 with one bf16/f32 scale per output channel (symmetric absmax,
as in vLLM's and TensorRT-LLM's weight-only int8); embedding, LM head and norms stay as loaded.
Scales are taken over the whole input axis, also when tp splits it (o, down), so a quantized
model gives the same logits at every tp. Quantizing happens after the weights are on the
devices, one weight at a time: the unquantized model must fit while loading.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtp.model import GateUpLinear, Linear, QKVLinear
from jaxtp.sharding import named, spec_for

METHODS = ("int8",)
TARGETS = (QKVLinear, GateUpLinear)  # and every Linear except the LM head


@functools.partial(jax.jit, static_argnames=("axis", "q_sharding", "s_sharding"))
def _int8(w, *, axis, q_sharding, s_sharding):
    amax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=axis)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w.astype(jnp.float32) / jnp.expand_dims(scale, axis)), -127, 127)
    return (jax.lax.with_sharding_constraint(q.astype(jnp.int8), q_sharding),
            jax.lax.with_sharding_constraint(scale.astype(w.dtype), s_sharding))


def int8(graphdef: nnx.GraphDef, params: nnx.State, mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """Quantize a loaded model's projection weights in place of the originals."""
    model = nnx.merge(graphdef, params)
    pp = mesh.shape.get("pp", 1)
    for path, module in nnx.iter_graph(model):
        name = ".".join(map(str, path))
        if not (isinstance(module, TARGETS) or (isinstance(module, Linear) and name != "lm_head")):
            continue
        w = module.weight[...]
        base = 2 if isinstance(module, Linear) else 3           # [in, out] / [in, tp|2, w]
        axis = w.ndim - base                                    # the input axis (after a pp axis)
        q, s = _int8(w, axis=axis, q_sharding=named(mesh, spec_for(f"{name}.weight", pp)),
                     s_sharding=named(mesh, spec_for(f"{name}.scale", pp)))
        module.weight = nnx.Param(q)
        module.scale = nnx.Param(s)
    return nnx.split(model)
