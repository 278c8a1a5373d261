"""The device side of the engine: the jitted prefill and decode programs over a slot-based KV
cache, the pytrees they take, and `ModelRunner`, which holds the device state and turns the
scheduler's choices (these sequences into these slots; a chunk over every slot) into calls.

The cache has a fixed number of rows ("slots"). Prefill runs a group of new prompts and writes
their keys/values into their slots; decode advances every slot `steps` tokens in an on-device
loop (finished and empty slots idle in place). Shapes are bucketed (prompt group size and
length to powers of two) so a run compiles a handful of programs once; the cache and the decode
state are donated so XLA updates them in place.

With data parallelism the slots (and every per-slot array) are split on `dp` along the batch;
with pipeline stages the model and cache are stacked per stage (pipeline.py) and nothing here
changes but the cache's leading axis. Host data goes in and out only through `distributed.put`
/ `fetch`, so the same code runs as one process or as many (multi-controller).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxtp import distributed
from jaxtp.engine import kv_cache
from jaxtp.engine.kv_cache import KVCache
from jaxtp.engine.sampling import (MAX_LOGPROBS, Penalties, SamplerArrays, SamplingParams, TokenLogprobs,
                                   sample, token_logprobs)
from jaxtp.engine.sequence import Sequence
from jaxtp.ops import OpsConfig
from jaxtp.sharding import ROWS_SPEC

CACHE_BUCKET = 128  # cache lengths are rounded up to this, to bound the number of compiled shapes

# Number of times each jitted function was traced (a trace precedes every compilation).
TRACES: collections.Counter = collections.Counter()


def bucket(n: int, minimum: int = 1) -> int:
    """Next power of two >= n (and >= minimum)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything static about one jitted call: how ops run on the mesh, and which variant of
    the step a group of sequences needs (each distinct value compiles once)."""
    ops: OpsConfig
    greedy: bool = True
    min_tokens: bool = False          # some row has min_tokens: stop tokens may be banned
    logprobs: int | None = None       # top-k log-probs per sampled token (None: not computed)
    prompt_logprobs: int | None = None
    steps: int = 1                    # decode steps per call (a chunk)

    @classmethod
    def for_group(cls, ops: OpsConfig, seqs: list[Sequence], **kw) -> "StepConfig":
        return cls(ops, greedy=all(s.params.greedy for s in seqs),
                   min_tokens=any(s.params.min_tokens > 0 for s in seqs),
                   logprobs=logprob_bucket(s.params.logprobs for s in seqs), **kw)


def logprob_bucket(ks) -> int | None:
    """The static top-k for a group: None if nobody asked, else all that may be asked (the host
    keeps each sequence's own k), so a server compiles two variants, not one per k."""
    return None if all(k is None for k in ks) else MAX_LOGPROBS


class Rows(NamedTuple):
    """Per-slot request constants on device, [B]."""
    sampler: SamplerArrays
    max_tokens: jax.Array

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], stops: list[list[int]],
              indices: list[int] | None = None) -> "Rows":
        """Host arrays for one row per params/seed/stop-id list."""
        return cls(SamplerArrays.build(params, seeds, stops, indices),
                   np.array([p.max_tokens for p in params], np.int32))


class DecodeState(NamedTuple):
    """The per-slot inputs of a decode step, carried from step to step."""
    tokens: jax.Array   # last sampled token, not yet in the cache
    pos: jax.Array      # where `tokens` will be written
    count: jax.Array    # tokens generated so far
    done: jax.Array
    penalties: Penalties | None = None

    @classmethod
    def idle(cls, slots: int) -> "DecodeState":
        """Host arrays for `slots` empty slots (done, so decode leaves them alone)."""
        return cls(*(np.zeros(slots, np.int32) for _ in range(3)), np.ones(slots, bool))


class PrefillBatch(NamedTuple):
    """The inputs of a prefill call: prompts tokens [n, T] (right-padded), their true lengths
    [n], and the cache slot each goes to (out of range: a padding row, dropped)."""
    tokens: jax.Array
    lens: jax.Array
    slots: jax.Array


class Step(NamedTuple):
    """What a prefill or decode call produced: tokens [..., B] (-1 where a row was already done),
    if asked for, their log-probabilities, and every slot's done flag after the call (apart from
    the state, which the next call takes over: the host reads this one later)."""
    tokens: jax.Array
    logprobs: TokenLogprobs | None
    done: jax.Array


class ModelDef:
    """The static half of a model for the jitted steps: its nnx GraphDef and the treedef of its
    weights, hashed once. jit hashes static arguments and flattens the others on every call; an
    nnx GraphDef's hash walks the whole module tree and an nnx.State flattens in Python per
    leaf, a millisecond or more per call for a real model, where (ModelDef, flat list of
    arrays) dispatches in a tenth of that. Decode runs a call per chunk of tokens, so this is
    per-token latency."""

    def __init__(self, graphdef: nnx.GraphDef, treedef):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, ModelDef) and self._hash == other._hash
                                 and self.graphdef == other.graphdef and self.treedef == other.treedef)

    def merge(self, weights: list):
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, weights))


def split(graphdef: nnx.GraphDef, params: nnx.State) -> tuple[ModelDef, list]:
    """(ModelDef, weights as a flat list of arrays): the form the jitted steps take."""
    weights, treedef = jax.tree.flatten(params)
    return ModelDef(graphdef, treedef), weights


def _constrain_cache(cache: KVCache, mesh) -> KVCache:
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, kv_cache.cache_sharding(mesh, x.ndim)),
                        cache)


def _is_done(tok, count, rows: Rows):
    stop = jnp.any(tok[:, None] == rows.sampler.stop_ids, axis=-1) & (count >= rows.sampler.min_tokens)
    return stop | (count >= rows.max_tokens)


def _logprobs(logits, tok, k):
    return None if k is None else token_logprobs(logits, tok, k)


def _prompt_penalties(batch: PrefillBatch, shape) -> Penalties:
    """The penalties' statistics of fresh prompts: which tokens each holds, none generated."""
    t = batch.tokens.shape[1]
    rows = jnp.arange(shape[0])[:, None]
    valid = (jnp.arange(t)[None, :] < batch.lens[:, None]).astype(jnp.int32)
    seen = jnp.zeros(shape, jnp.int32).at[rows, batch.tokens].add(valid)
    return Penalties(seen > 0, jnp.zeros(shape, jnp.int32))


@functools.partial(jax.jit, static_argnames=("model_def", "cfg"), donate_argnames=("cache", "state"))
def prefill(model_def: ModelDef, weights, cache: KVCache, state: DecodeState, rows: Rows,
            batch: PrefillBatch, cfg: StepConfig):
    """The prompts of `batch` into their cache slots; samples each prompt's first token.

    Returns (Step [n], prompt TokenLogprobs [n, T-1] or None, state, cache).
    """
    TRACES["prefill"] += 1
    model, mesh = model_def.merge(weights), cfg.ops.mesh
    (n, t), (b, kvh, _, hd) = batch.tokens.shape, cache.k[0].shape[-4:]
    layers, stages = len(cache.k), cache.k[0].shape[:-4]  # stages: () or (pp,)
    fresh = jnp.zeros((*stages, n, kvh, t, hd), cache.k[0].dtype)
    h, new = model.hidden(batch.tokens, _constrain_cache(KVCache([fresh] * layers, [fresh] * layers), mesh),
                          jnp.zeros((n,), jnp.int32), cfg.ops)
    put = lambda c, x: c.at[..., batch.slots, :, :t, :].set(x, mode="drop")  # noqa: E731
    cache = KVCache(list(map(put, cache.k, new.k)), list(map(put, cache.v, new.v)))

    r = jax.tree.map(lambda x: x[jnp.minimum(batch.slots, b - 1)], rows)
    logits = model.logits(h[jnp.arange(n), batch.lens - 1])
    penalties = None if state.penalties is None else _prompt_penalties(batch, logits.shape)
    zero = jnp.zeros((n,), jnp.int32)
    tok = sample(logits, r.sampler, zero, model.vocab_size, cfg.greedy, penalties, cfg.min_tokens)
    if penalties is not None:
        penalties = penalties._replace(counts=penalties.counts.at[jnp.arange(n), tok].add(1))
    prompt_lp = None
    if cfg.prompt_logprobs is not None:
        prompt_lp = token_logprobs(model.logits(h[:, :-1]), batch.tokens[:, 1:], cfg.prompt_logprobs)

    new_rows = DecodeState(tok, batch.lens, zero + 1, _is_done(tok, zero + 1, r), penalties)
    state = jax.tree.map(lambda old, x: old.at[batch.slots].set(x, mode="drop"), state, new_rows)
    step = Step(tok, _logprobs(logits, tok, cfg.logprobs), state.done)
    return step, prompt_lp, state, _constrain_cache(cache, mesh)


def _decode_step(model, rows: Rows, cfg: StepConfig, i, carry):
    """Step i of the decode loop: one token for every slot that is not done."""
    cache, s, out, lp_out = carry
    b = s.tokens.shape[0]
    h, cache = model.hidden(s.tokens[:, None], cache, s.pos, cfg.ops)
    logits = model.logits(h[:, 0])
    tok = sample(logits, rows.sampler, s.count, model.vocab_size, cfg.greedy, s.penalties, cfg.min_tokens)
    if cfg.logprobs is not None:
        lp_out = jax.tree.map(lambda o, x: o.at[i].set(x), lp_out, token_logprobs(logits, tok, cfg.logprobs))
    count = s.count + 1
    penalties = s.penalties
    if penalties is not None:
        penalties = penalties._replace(
            counts=penalties.counts.at[jnp.arange(b), tok].add(jnp.where(s.done, 0, 1)))
    tok = jnp.where(s.done, -1, tok)
    done = s.done | _is_done(tok, count, rows)
    # A finished row re-runs its last token at its last position: an idempotent cache write.
    nxt = DecodeState(jnp.where(s.done, s.tokens, tok), jnp.where(s.done, s.pos, s.pos + 1),
                      jnp.where(s.done, s.count, count), done, penalties)
    return _constrain_cache(cache, cfg.ops.mesh), nxt, out.at[i].set(tok), lp_out


@functools.partial(jax.jit, static_argnames=("model_def", "cfg"), donate_argnames=("cache", "state"))
def decode(model_def: ModelDef, weights, cache: KVCache, state: DecodeState, rows: Rows, cfg: StepConfig):
    """`cfg.steps` decode steps for every slot on device -> (Step [steps, B], state, cache)."""
    TRACES["decode"] += 1
    model = model_def.merge(weights)
    b, steps = state.tokens.shape[0], cfg.steps
    out = jnp.full((steps, b), -1, jnp.int32)
    k = cfg.logprobs or 0
    lp_out = TokenLogprobs(jnp.zeros((steps, b)), jnp.zeros((steps, b), jnp.int32),
                           jnp.zeros((steps, b, k), jnp.int32), jnp.zeros((steps, b, k)))
    body = functools.partial(_decode_step, model, rows, cfg)
    # A fixed trip count: no per-step predicate copy to the host; the host checks `done` per chunk.
    cache, state, out, lp_out = jax.lax.fori_loop(0, steps, body, (cache, state, out, lp_out))
    return Step(out, lp_out if cfg.logprobs is not None else None, state.done), state, cache


@jax.jit
def stop_rows(state: DecodeState, stop) -> DecodeState:
    return state._replace(done=state.done | stop)


@functools.partial(jax.jit, static_argnames=("model_def", "ops"))
def forward_logits(model_def: ModelDef, weights, tokens, ops: OpsConfig):
    """Full-sequence float32 logits [B, T, V_padded] for equal-length prompts (tests, scoring)."""
    TRACES["forward_logits"] += 1
    model = model_def.merge(weights)
    attn = model.model.layers[0].self_attn
    b, t = tokens.shape
    pp = ops.mesh.shape.get("pp", 1)
    n, shape = kv_cache.shape(len(model.model.layers) * pp, b, attn.num_kv_heads, t, attn.head_dim, pp)
    dtype = model.model.norm.weight[...].dtype
    cache = KVCache([jnp.zeros(shape, dtype)] * n, [jnp.zeros(shape, dtype)] * n)
    h, _ = model.hidden(tokens, _constrain_cache(cache, ops.mesh), jnp.zeros((b,), jnp.int32), ops)
    return model.logits(h)


class Pending(NamedTuple):
    """Device work whose tokens the host has not read: its Step (tokens [steps, columns]), and
    the sequence and slot of each column when it was queued."""
    step: Step
    prompt_logprobs: TokenLogprobs | None
    seqs: list[Sequence | None]
    slots: list[int]


class Column(NamedTuple):
    """One sequence's share of read work: its new tokens (and log-prob entries), whether its
    slot was done after the call, and its prompt's log-prob entries if it asked."""
    seq: Sequence
    tokens: list[int]
    logprobs: list[tuple]
    done: bool
    prompt_logprobs: list[tuple] | None


def _entry(lp: TokenLogprobs, at: tuple, k: int) -> tuple:
    return (float(lp.logprob[at]), int(lp.rank[at]), lp.top_ids[at][:k].tolist(),
            lp.top_logprobs[at][:k].tolist())


def _set_rows(all_rows: np.ndarray, slots: list[int], new: np.ndarray) -> np.ndarray:
    """Host update of per-slot arrays; stop_ids may need widening to the new rows' count."""
    all_rows = np.array(all_rows)
    if all_rows.ndim == 2 and new.shape[1] > all_rows.shape[1]:
        pad = np.full((all_rows.shape[0], new.shape[1] - all_rows.shape[1]), -1, all_rows.dtype)
        all_rows = np.concatenate([all_rows, pad], axis=1)
    if all_rows.ndim == 2:
        new = np.pad(new, ((0, 0), (0, all_rows.shape[1] - new.shape[1])), constant_values=-1)
    all_rows[slots] = new
    return all_rows


class ModelRunner:
    """The device state of `slots` cache rows of `max_len` tokens (keys and values, the decode
    state, the per-slot sampling constants) and the calls that advance it. It is told which
    sequences go where and decides nothing itself."""

    def __init__(self, model, slots: int, max_len: int):
        cfg, self.model = model.config, model
        self.slots, self.max_len = slots, round_up(max_len, CACHE_BUCKET)
        self.cache = kv_cache.init(cfg.num_layers, slots, model.kv_heads, self.max_len, cfg.head_dim,
                                   model.dtype, model.mesh)
        self.per_row = NamedSharding(model.mesh, ROWS_SPEC)
        idle = SamplingParams(max_tokens=1, temperature=0.0)
        self.host_rows = Rows.build([idle] * slots, [0] * slots, [[]] * slots)
        self.rows = self._put(self.host_rows)
        self.state = self._put(DecodeState.idle(slots))

    def _put(self, tree):
        """Per-row host arrays -> device, split on dp."""
        return distributed.put(tree, self.per_row)

    def check(self, seq: Sequence) -> None:
        """Raise a ValueError if `seq` cannot be given a slot's rows (what would otherwise fail a
        whole prefill group later)."""
        try:
            Rows.build([seq.params], [seq.seed], [seq.stop_ids], [seq.index])
        except (OverflowError, TypeError, ValueError) as e:
            raise ValueError(f"cannot schedule this request: {e}") from None

    def stop(self, slots: list[int]) -> None:
        """Mark these slots done, so queued decode work leaves them alone."""
        mask = np.zeros(self.slots, bool)
        mask[slots] = True
        self.state = stop_rows(self.state, self._put(mask))

    def prefill(self, seqs: list[Sequence], slots: list[int]) -> Pending:
        """Queue the prefill of `seqs` into `slots` (one step: tokens [1, n])."""
        self._set_rows(seqs, slots)
        dp = self.model.mesh.shape["dp"]
        n, t = round_up(bucket(len(seqs)), dp), min(bucket(max(len(s.prompt) for s in seqs), 16), self.max_len)
        tokens = np.zeros((n, t), np.int32)
        for i, s in enumerate(seqs):
            tokens[i, : len(s.prompt)] = s.prompt
        lens = np.array([len(s.prompt) for s in seqs] + [1] * (n - len(seqs)), np.int32)
        slot_ids = np.array(slots + [self.slots] * (n - len(seqs)), np.int32)
        cfg = StepConfig.for_group(self.model.ops, seqs,
                                   prompt_logprobs=logprob_bucket(s.params.prompt_logprobs for s in seqs))
        step, prompt_lp, self.state, self.cache = prefill(
            *self.model.step_args, self.cache, self.state, self.rows,
            self._put(PrefillBatch(tokens, lens, slot_ids)), cfg)
        step = step._replace(tokens=step.tokens[None], logprobs=jax.tree.map(lambda x: x[None], step.logprobs))
        return Pending(step, prompt_lp, list(seqs), list(slots))

    def _set_rows(self, seqs: list[Sequence], slots: list[int]) -> None:
        """The new sequences' sampling constants into their slots (and penalty statistics for
        every slot, the first time a sequence needs them)."""
        new = Rows.build([s.params for s in seqs], [s.seed for s in seqs], [s.stop_ids for s in seqs],
                         [s.index for s in seqs])
        self.host_rows = jax.tree.map(lambda all_, x: _set_rows(all_, slots, x), self.host_rows, new)
        self.rows = self._put(self.host_rows)
        if self.state.penalties is None and any(s.params.penalized for s in seqs):
            v = self.model.padded_vocab
            self.state = self.state._replace(penalties=self._put(
                Penalties(np.zeros((self.slots, v), bool), np.zeros((self.slots, v), np.int32))))

    def decode(self, columns: list[Sequence | None], steps: int) -> Pending:
        """Queue `steps` decode steps over every slot; columns[i] is slot i's sequence."""
        cfg = StepConfig.for_group(self.model.ops, [s for s in columns if s is not None], steps=steps)
        step, self.state, self.cache = decode(*self.model.step_args, self.cache, self.state, self.rows, cfg)
        return Pending(step, None, list(columns), list(range(self.slots)))

    def read(self, pending: list[Pending]) -> list[Column]:
        """Wait for queued work (one fetch for all of it): each live sequence's share, in order."""
        out, vocab = [], self.model.config.vocab_size  # top-k past the vocabulary: padding, dropped
        for p, (step, prompt_lp) in zip(pending, distributed.fetch([(p.step, p.prompt_logprobs) for p in pending])):
            for col, (seq, slot) in enumerate(zip(p.seqs, p.slots)):
                if seq is None or seq.finished:
                    continue
                k, prompt = seq.params.logprobs, None
                if prompt_lp is not None and seq.params.prompt_logprobs is not None:
                    prompt = [_entry(prompt_lp, (col, j), min(seq.params.prompt_logprobs, vocab))
                              for j in range(len(seq.prompt) - 1)]
                at = np.nonzero(step.tokens[:, col] >= 0)[0]
                lps = [] if k is None else [_entry(step.logprobs, (j, col), min(k, vocab)) for j in at]
                out.append(Column(seq, step.tokens[at, col].tolist(), lps, bool(step.done[slot]), prompt))
        return out
