"""Pipeline parallelism: decoder layers split into `pp` stages over a `pp` mesh axis.

Design. Stage s owns the contiguous layers s*L/pp .. (s+1)*L/pp - 1. They are stored *stacked*:
`model.layers[j]` is one DecoderLayer whose every parameter has a leading [pp] axis split on
`pp` (entry s = HF layer s*L/pp + j), and the page pool is stacked the same way
([pp, *one stage's entry], split on `pp`; every stage uses the same block
tables), so each stage's devices hold only their
layers' weights and KV cache. A forward pass is one SPMD program over the whole mesh:

    buffer[pp, B, T, d] = (embed(tokens), 0, ..., 0)
    repeat pp times: every stage runs its layers on its buffer entry (a vmap over the stage
                     axis: no communication), then the buffer shifts one stage on (a
                     collective permute: the hand-off of hidden states between stages)
    h = buffer[last]; final norm and LM head

Only one stage holds real data at each of the pp hops; the others compute on a placeholder
and write their keys and values to the scratch page. Because the whole
pipeline is inside one jitted function, the engine's prefill, on-device decode loop and sampling
are unchanged, and it works across processes like any other collective.

What it costs: a token still passes the L layers one after another, and in every hop all stages
compute, so pp adds no throughput (no microbatching, each device does pp x its share of work) and
adds pp-1 hidden-state transfers per forward. What it buys is memory: each device holds 1/pp of
the decoder weights and of the KV cache. The embedding, final norm and LM head are replicated
over stages (every stage embeds and computes the logits).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtp.config import ModelConfig
from jaxtp.model import CausalLM, DecoderLayer
from jaxtp.ops.paged import SCRATCH_PAGE


def stage_layer(name: str, stage: int, per_stage: int) -> str:
    """'model.layers.j.X' of stage s -> the HF tensor name 'model.layers.{s*per_stage+j}.X'."""
    parts = name.split(".")
    parts[2] = str(stage * per_stage + int(parts[2]))
    return ".".join(parts)


class PipelinedLM(CausalLM):
    """CausalLM whose `model.layers` holds L/pp stacked layers (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, num_kv_heads: int, vocab: int, tp: int = 1, dtype=jnp.float32,
                 pp: int = 2):
        super().__init__(dataclasses.replace(cfg, num_layers=0), num_kv_heads, vocab, tp, dtype)
        self.pp = pp
        make = nnx.vmap(lambda _: DecoderLayer(cfg, num_kv_heads, tp, dtype), in_axes=0, out_axes=0)
        self.model.layers = nnx.List([make(jnp.arange(pp)) for _ in range(cfg.num_layers // pp)])

    def hidden(self, tokens, cache, start, table, ops=None, packing=None):
        """Same contract as CausalLM.hidden; cache entries are [pp, *kv_cache's layout]. The
        decode kernel does not run with stages (ops.attention.resolve), so no counters pass."""
        at = self.positions(start, tokens.shape[1], table, packing)
        x = self.model.embed_tokens(tokens)
        buf = jnp.zeros((self.pp, *x.shape), x.dtype).at[0].set(x)
        ks, vs = list(cache.k), list(cache.v)

        def run(layer, x, k, v, live):  # one stage's copy of one layer; idle stages write scratch
            mine = at._replace(table=jnp.where(live, at.table, SCRATCH_PAGE))
            x, _, k, v, _ = layer(x, layer.input_layernorm(x), None, mine, k, v, ops)
            return x, k, v

        for hop in range(self.pp):
            live = jnp.arange(self.pp) == hop        # the stage holding real data at this hop
            for j, layer in enumerate(self.model.layers):
                graphdef, params = nnx.split(layer)
                buf, ks[j], vs[j] = jax.vmap(lambda p, *a: run(nnx.merge(graphdef, p), *a))(
                    params, buf, ks[j], vs[j], live)
            if hop < self.pp - 1:
                buf = jnp.roll(buf, 1, axis=0)        # stage s -> s+1: a collective permute
        return self.model.norm(buf[-1]), cache._replace(k=ks, v=vs)
