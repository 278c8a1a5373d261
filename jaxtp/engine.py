"""The hot path: jitted prefill and multi-token decode, and the host loop that drives them.

Shapes are bucketed (batch and prompt length to powers of two, cache length to a multiple of
CACHE_BUCKET) so a run compiles a handful of programs once; the cache is donated so XLA updates
it in place. Decode runs `chunk` tokens per dispatch in an on-device loop; the host only reads
tokens back between chunks.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxtp import kv_cache
from jaxtp.kv_cache import KVCache
from jaxtp.sampling import SamplerArrays, SamplingParams, sample
from jaxtp.sharding import KV_CACHE_SPEC, REPLICATED

CACHE_BUCKET = 128  # cache lengths are rounded up to this, to bound the number of compiled shapes

# Number of times each jitted function was traced (a trace precedes every compilation).
TRACES: collections.Counter = collections.Counter()


class Rows(NamedTuple):
    """Per-row request state on device, all [B] (stop_ids [B, K], -1 padded)."""
    sampler: SamplerArrays
    max_tokens: jax.Array
    min_tokens: jax.Array
    stop_ids: jax.Array

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], stops: list[list[int]]) -> "Rows":
        """Host arrays for one row per params/seed/stop-id list."""
        stop_ids = np.full((len(params), max(1, max(map(len, stops)))), -1, np.int32)
        for i, x in enumerate(stops):
            stop_ids[i, : len(x)] = x
        return cls(SamplerArrays.build(params, seeds),
                   np.array([p.max_tokens for p in params], np.int32),
                   np.array([p.min_tokens for p in params], np.int32), stop_ids)


class DecodeState(NamedTuple):
    tokens: jax.Array   # last sampled token, not yet in the cache
    pos: jax.Array      # where `tokens` will be written
    count: jax.Array    # tokens generated so far
    done: jax.Array


def _constrain_cache(cache: KVCache, mesh: Mesh) -> KVCache:
    spec = NamedSharding(mesh, KV_CACHE_SPEC)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec), cache)


def _is_done(tok, count, rows: Rows):
    stop = jnp.any(tok[:, None] == rows.stop_ids, axis=-1) & (count >= rows.min_tokens)
    return stop | (count >= rows.max_tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "greedy"), donate_argnames=("cache",))
def prefill(graphdef, params, cache: KVCache, tokens, lens, rows: Rows, *, mesh, greedy):
    """Prompts tokens [B, T] (right-padded, true lengths lens) -> (first DecodeState, cache)."""
    TRACES["prefill"] += 1
    model = nnx.merge(graphdef, params)
    b = tokens.shape[0]
    h, cache = model.hidden(tokens, cache, jnp.zeros((b,), jnp.int32))
    logits = model.logits(h[jnp.arange(b), lens - 1])
    count = jnp.ones((b,), jnp.int32)
    tok = sample(logits, rows.sampler, count - 1, model.vocab_size, greedy)
    state = DecodeState(tok, lens, count, _is_done(tok, count, rows))
    return state, _constrain_cache(cache, mesh)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "greedy", "steps"),
                   donate_argnames=("cache",))
def decode(graphdef, params, cache: KVCache, state: DecodeState, rows: Rows, *, mesh, greedy, steps):
    """`steps` decode steps on device -> (tokens [steps, B] (-1 once a row is done), state, cache)."""
    TRACES["decode"] += 1
    model = nnx.merge(graphdef, params)
    out = jnp.full((steps, state.tokens.shape[0]), -1, jnp.int32)

    def body(i, carry):
        cache, s, out = carry
        h, cache = model.hidden(s.tokens[:, None], cache, s.pos)
        tok = sample(model.logits(h[:, 0]), rows.sampler, s.count, model.vocab_size, greedy)
        count = s.count + 1
        tok = jnp.where(s.done, -1, tok)
        done = s.done | _is_done(tok, count, rows)
        # A finished row re-runs its last token at its last position: an idempotent cache write.
        nxt = DecodeState(jnp.where(s.done, s.tokens, tok), jnp.where(s.done, s.pos, s.pos + 1),
                          jnp.where(s.done, s.count, count), done)
        return _constrain_cache(cache, mesh), nxt, out.at[i].set(tok)

    # A fixed trip count: no per-step predicate copy to the host; the host checks `done` per chunk.
    cache, state, out = jax.lax.fori_loop(0, steps, body, (cache, state, out))
    return out, state, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def forward_logits(graphdef, params, tokens, *, mesh):
    """Full-sequence float32 logits [B, T, V_padded] for equal-length prompts (tests, scoring)."""
    TRACES["forward_logits"] += 1
    model = nnx.merge(graphdef, params)
    attn = model.model.layers[0].self_attn
    b, t = tokens.shape
    shape = (b, attn.num_kv_heads, t, attn.head_dim)
    dtype = model.model.norm.weight[...].dtype
    cache = KVCache([jnp.zeros(shape, dtype)] * len(model.model.layers),
                    [jnp.zeros(shape, dtype)] * len(model.model.layers))
    h, _ = model.hidden(tokens, _constrain_cache(cache, mesh), jnp.zeros((b,), jnp.int32))
    return model.logits(h)


def bucket(n: int, minimum: int = 1) -> int:
    """Next power of two >= n (and >= minimum)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass
class Finished:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"


def run(model, prompts: list[list[int]], params: list[SamplingParams], seeds: list[int],
        chunk: int = 16) -> Iterator[tuple[int, list[int], str | None]]:
    """Generate for a batch of token-id prompts; yields (row, new token ids, finish reason or None)
    after every decode chunk, so callers can stream. `model` is a jaxtp.Model."""
    cfg, mesh = model.config, model.mesh
    n = len(prompts)
    eos = list(cfg.eos_token_ids)
    stops = [list(p.stop_token_ids) + ([] if p.ignore_eos else eos) for p in params]

    b = bucket(n)
    t = bucket(max(len(p) for p in prompts), 16)
    max_len = max(len(p) + q.max_tokens for p, q in zip(prompts, params))
    s = -(-max(max_len, t) // CACHE_BUCKET) * CACHE_BUCKET
    pad_rows = b - n

    tokens = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lens = np.array([len(p) for p in prompts] + [1] * pad_rows, np.int32)
    rows = Rows.build(params + [SamplingParams(max_tokens=1, temperature=0.0)] * pad_rows,
                      seeds + [0] * pad_rows, stops + [[]] * pad_rows)
    replicated = NamedSharding(mesh, REPLICATED)
    tokens, lens, rows = jax.device_put((tokens, lens, rows), replicated)
    greedy = all(p.greedy for p in params)

    cache = kv_cache.init(cfg.num_layers, b, model.kv_heads, s, cfg.head_dim, model.dtype, mesh)
    state, cache = prefill(model.graphdef, model.params, cache, tokens, lens, rows,
                           mesh=mesh, greedy=greedy)
    first, done = jax.device_get((state.tokens, state.done))
    out: list[list[int]] = [[int(first[i])] for i in range(n)]
    finished = [False] * n

    def report(i, new, done):
        tok = out[i][-1]
        reason = None
        if done[i]:
            reason = "stop" if tok in stops[i] and len(out[i]) >= params[i].min_tokens else "length"
            finished[i] = True
        return i, new, reason

    for i in range(n):
        yield report(i, [int(first[i])], done)
    while not all(finished):
        toks, state, cache = decode(model.graphdef, model.params, cache, state, rows,
                                    mesh=mesh, greedy=greedy, steps=chunk)
        toks, done = jax.device_get((toks, state.done))
        for i in range(n):
            if finished[i]:
                continue
            new = [int(x) for x in toks[:, i] if x >= 0]
            out[i].extend(new)
            yield report(i, new, done)
