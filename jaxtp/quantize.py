"""Weight quantization at load (`jaxtp.load(..., quantization=...)`): "int8" (weight-only),
"fp8_weight_only" (e4m3 weights), "fp8" (e4m3 weights and activations, W8A8: each token's
activations get their own scale as they enter a projection, as vLLM's dynamic fp8 does).

Decode reads every weight once per token, so halving weight bytes is the largest lever left
once a step is bandwidth-bound. The four projection weights of every layer (q|k|v, o,
gate|up, down) become 8-bit with one bf16/f32 scale per output channel (symmetric absmax,
as in vLLM's and TensorRT-LLM's weight-only int8); embedding, LM head and norms stay as loaded.
Scales are taken over the whole input axis, also when tp splits it (o, down), so a quantized
model gives the same logits at every tp.

The wide projections' 8-bit weights (q|k|v, gate|up) are stored [out..., in] (`weight_t`, as
Hugging Face stores them): XLA's decode products read that layout faster, and the decode kernel
(ops/kernels/quant_matmul.py) takes it as its tensor cores' register operand. o and down stay
[in, out] for weight-only methods, where [out, in] made batch-32 decode slower; W8A8 stores them
[out, in] too, the layout its fp8 prefill GEMMs want (docs/performance.md). Quantizing happens after the weights are on the
devices, one weight at a time: the unquantized model must fit while loading.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtp.model import GateUpLinear, Linear, QKVLinear
from jaxtp.sharding import named, spec_for

METHODS = ("int8", "fp8", "fp8_weight_only")
TARGETS = (QKVLinear, GateUpLinear)  # and every Linear except the LM head


@functools.partial(jax.jit, static_argnames=("axis", "dtype", "q_sharding", "s_sharding", "transpose"))
def _quantize(w, *, axis, dtype, q_sharding, s_sharding, transpose: bool):
    """w -> (q, scale) with q * scale ~ w: symmetric, the scale the absmax over `axis` / the
    dtype's largest value (int8: rounded to the nearest integer; fp8: e4m3's own rounding).
    transpose: q with `axis` moved last (stored [out..., in])."""
    top = 127.0 if dtype == jnp.int8 else float(jnp.finfo(dtype).max)
    amax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=axis)
    scale = jnp.where(amax > 0, amax / top, 1.0)
    q = jnp.clip(w.astype(jnp.float32) / jnp.expand_dims(scale, axis), -top, top)
    q = jnp.round(q) if dtype == jnp.int8 else q
    q = jnp.moveaxis(q, axis, -1) if transpose else q
    return (jax.lax.with_sharding_constraint(q.astype(dtype), q_sharding),
            jax.lax.with_sharding_constraint(scale.astype(w.dtype), s_sharding))


def quantize(graphdef: nnx.GraphDef, params: nnx.State, mesh, method: str) -> tuple[nnx.GraphDef, nnx.State]:
    """Quantize a loaded model's projection weights (`method`: one of METHODS) in place of the
    originals."""
    if method not in METHODS:
        raise ValueError(f"quantization must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    dtype = jnp.int8 if method == "int8" else jnp.float8_e4m3fn
    model = nnx.merge(graphdef, params)
    pp = mesh.shape.get("pp", 1)
    for path, module in nnx.iter_graph(model):
        name = ".".join(map(str, path))
        if not (isinstance(module, TARGETS) or (isinstance(module, Linear) and name != "lm_head")):
            continue
        w, wide = module.weight[...], isinstance(module, TARGETS)
        axis = w.ndim - (3 if wide else 2)  # in of [in, tp|2, w] / [in, out], after any pp axis
        transpose = wide or method == "fp8"
        q_name = f"{name}.weight_t" if transpose else f"{name}.weight"
        q, s = _quantize(w, axis=axis, dtype=dtype, q_sharding=named(mesh, spec_for(q_name, pp)),
                         s_sharding=named(mesh, spec_for(f"{name}.scale", pp)), transpose=transpose)
        if transpose:
            module.weight, module.weight_t = nnx.data(None), nnx.Param(q)
        else:
            module.weight = nnx.Param(q)
        module.scale = nnx.Param(s)
        module.w8a8 = method == "fp8"
    return nnx.split(model)

