"""The device side of the engine: the jitted prefill and decode programs over the paged KV
cache, the pytrees they take, and `ModelRunner`, which holds the device state and turns the
scheduler's choices (these chunks of prompts; a decode chunk over every slot) into calls.

Keys and values live in a pool of pages (kv_cache.py); each sequence's block table lists its
pages. There is a fixed number of decode rows ("slots"). Prefill runs chunks of prompts, writing
their keys/values through their tables; a chunk that ends a prompt samples its first token into
its slot. Decode advances every slot `steps` tokens in an on-device loop (finished, empty and
still-prefilling slots idle, writing only to the scratch page). Shapes are bucketed (chunk rows
and length to powers of two) so a run compiles a handful of programs once; the cache and the
decode state are donated so XLA updates them in place.

With data parallelism the slots (and every per-slot array) and the pages are split on `dp`;
with pipeline stages the model and cache are stacked per stage (pipeline.py) and nothing here
changes but the cache's leading axis. Host data goes in and out only through `distributed.put`
/ `fetch`, so the same code runs as one process or as many (multi-controller).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import os
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
from jaxtp.engine.sequence import Sequence, Status
from jaxtp.model import Packing
from jaxtp.ops import OpsConfig
from jaxtp.ops import paged
from jaxtp.ops.paged import SCRATCH_PAGE
from jaxtp.sharding import ROWS_SPEC

# Number of times each jitted function was traced (a trace precedes every compilation).
TRACES: collections.Counter = collections.Counter()


def bucket(n: int, minimum: int = 1) -> int:
    """Next power of two >= n (and >= minimum)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def row_bucket(n: int, most: int) -> int:
    """Rows of the prefill or decode program for n rows of work, at most `most`: 1, 4, 16, then
    multiples of 16 to 64 and of 64 beyond. A padding row costs little (it reads no KV, and up
    to ~64 rows a projection costs what one does: it reads the weights), so few programs compile."""
    granule = 1 if n <= 1 else 4 if n <= 4 else 16 if n <= 64 else 64
    return min(most, round_up(max(n, 1), granule))


def row_buckets(most: int) -> list[int]:
    """Every value row_bucket takes up to `most`."""
    return sorted({row_bucket(n, most) for n in range(1, most + 1)})


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything static about one jitted call: how ops run on the mesh, and which variant of
    the step a group of sequences needs (each distinct value compiles once, all of them in
    `ModelRunner.warmup`). A plain step (every row SamplingParams.plain) takes the argmax; the
    other one samples and always applies min_tokens and penalties and computes the sampled
    tokens' log-probs (top MAX_LOGPROBS), so no request needs a third."""
    ops: OpsConfig
    plain: bool = True                # argmax only: no sampler, penalties, log-probs
    prompt_logprobs: int | None = None
    steps: int = 1                    # decode steps per call (a chunk)


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
    penalties: Penalties

    @classmethod
    def idle(cls, slots: int, vocab: int) -> "DecodeState":
        """Host arrays for `slots` empty slots (done, so decode leaves them alone) over a
        (padded) vocabulary of `vocab`."""
        return cls(*(np.zeros(slots, np.int32) for _ in range(3)), np.ones(slots, bool),
                   Penalties(np.zeros((slots, vocab), bool), np.zeros((slots, vocab), np.int32)))


class PrefillBatch(NamedTuple):
    """One prefill call: a chunk of a prompt per row. tokens [n, T] (right-padded); row i's
    chunk sits at positions starts[i] ... + lens[i] in the pages of table [n, W]; slots[i] is
    its sequence's decode slot (out of range: a padding row), and where sample[i] its chunk ends
    the prompt and its first token is sampled into the slot. prompt_lens[i] counts the
    sequence's own prompt (past it, a recomputed sequence's generated tokens); targets [n, T]:
    the token after each position (prompt log-probs). The projections run on the same tokens
    packed, N per replica: packed [dp * N], with the model.Packing of rows and packed tokens."""
    tokens: jax.Array
    starts: jax.Array
    lens: jax.Array
    table: jax.Array
    slots: jax.Array
    sample: jax.Array
    prompt_lens: jax.Array
    targets: jax.Array
    packed: jax.Array
    unpack: jax.Array
    pack: jax.Array

    @classmethod
    def whole_prompts(cls, tokens: np.ndarray, table: np.ndarray) -> "PrefillBatch":
        """Host arrays prefilling each row of tokens [n, T] whole into slot n's pages of table
        [n, W] and sampling its first token (one replica; the packed tokens are the rows')."""
        (n, t), flat = tokens.shape, np.arange(tokens.size, dtype=np.int32)
        lens = np.full(n, t, np.int32)
        return cls(tokens, np.zeros(n, np.int32), lens, table, np.arange(n, dtype=np.int32), np.ones(n, bool),
                   lens, np.zeros_like(tokens), tokens.reshape(-1), flat.reshape(n, t), flat)


class Step(NamedTuple):
    """What a prefill or decode call produced: tokens [..., B] (-1 where a row was already done),
    their log-probabilities (top MAX_LOGPROBS), and every slot's done flag after the call (apart
    from the state, which the next call takes over: the host reads this one later)."""
    tokens: jax.Array
    logprobs: TokenLogprobs
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


def _chunk_penalties(old: Penalties, batch: PrefillBatch) -> Penalties:
    """Every slot's penalty statistics after this call's chunks: a sequence's first chunk starts
    them afresh; prompt tokens are seen, later ones (a recomputed sequence's) counted. A
    sequence's chunk may span several rows, so the rows add into their slot."""
    b, (n, t) = old.counts.shape[0], batch.tokens.shape
    pos = batch.starts[:, None] + jnp.arange(t)[None, :]
    valid = jnp.arange(t)[None, :] < batch.lens[:, None]
    in_prompt = valid & (pos < batch.prompt_lens[:, None])
    fresh = jnp.zeros(b, bool).at[jnp.where(batch.starts == 0, batch.slots, b)].set(True, mode="drop")
    slot = jnp.broadcast_to(batch.slots[:, None], (n, t))
    seen = (old.in_prompt & ~fresh[:, None]).at[jnp.where(in_prompt, slot, b), batch.tokens].set(True, mode="drop")
    counts = jnp.where(fresh[:, None], 0, old.counts).at[jnp.where(valid & ~in_prompt, slot, b), batch.tokens].add(
        1, mode="drop")
    return Penalties(seen, counts)


@functools.partial(jax.jit, static_argnames=("model_def", "cfg"), donate_argnames=("cache", "state"))
def prefill(model_def: ModelDef, weights, cache: KVCache, state: DecodeState, rows: Rows,
            batch: PrefillBatch, cfg: StepConfig):
    """The chunks of `batch` into their pages; rows whose chunk ends a prompt sample its first
    token into their decode slot.

    Returns (Step [n] (-1 for rows that sample nothing; no log-probs in a plain step), prompt
    TokenLogprobs [n, T] or None, state, cache).
    """
    TRACES["prefill"] += 1
    model, mesh, dp = model_def.merge(weights), cfg.ops.mesh, cfg.ops.dp
    n, b = batch.tokens.shape[0], state.tokens.shape[0]
    h, cache = model.hidden(batch.packed.reshape(dp, -1), _constrain_cache(cache, mesh), batch.starts, batch.table,
                            cfg.ops, Packing(batch.unpack, batch.pack))
    h = h.reshape(-1, h.shape[-1])
    slot = jnp.minimum(batch.slots, b - 1)
    r = jax.tree.map(lambda x: x[slot], rows)
    logits = model.logits(paged.take_rows(h, batch.unpack[jnp.arange(n), batch.lens - 1], dp))
    generated = batch.starts + batch.lens - batch.prompt_lens  # before this token (recomputed: > 0)
    if cfg.plain:  # a plain row's penalty statistics are never read: left as they are
        tok = sample(logits, r.sampler, generated, model.vocab_size, True)
    else:
        penalties = _chunk_penalties(state.penalties, batch)
        tok = sample(logits, r.sampler, generated, model.vocab_size, False, jax.tree.map(lambda x: x[slot], penalties))
        counts = penalties.counts.at[jnp.where(batch.sample, batch.slots, b), tok].add(1, mode="drop")
        state = state._replace(penalties=penalties._replace(counts=counts))
    prompt_lp = None
    if cfg.prompt_logprobs is not None:
        prompt_lp = token_logprobs(model.logits(paged.take_rows(h, batch.unpack, dp)), batch.targets,
                                   cfg.prompt_logprobs)

    count = generated + 1
    new_rows = dict(tokens=tok, pos=batch.starts + batch.lens, count=count, done=_is_done(tok, count, r))
    into = jnp.where(batch.sample, batch.slots, b)  # only rows that sampled take over their slot
    state = state._replace(**{f: getattr(state, f).at[into].set(x, mode="drop") for f, x in new_rows.items()})
    logprobs = None if cfg.plain else token_logprobs(logits, tok, MAX_LOGPROBS)
    step = Step(jnp.where(batch.sample, tok, -1), logprobs, state.done)
    return step, prompt_lp, state, _constrain_cache(cache, mesh)


def _decode_step(model, rows: Rows, table, cfg: StepConfig, i, carry):
    """Step i of the decode loop: one token for every slot that is not done."""
    cache, s, out, lp_out = carry
    b = s.tokens.shape[0]
    # A done slot may hold a sequence still prefilling: its re-run writes only to scratch, at
    # position 0, so its attention reads one position, not its whole length again.
    live = jnp.where(s.done[:, None], SCRATCH_PAGE, table)
    h, cache = model.hidden(s.tokens[:, None], cache, jnp.where(s.done, 0, s.pos), live, cfg.ops)
    logits = model.logits(h[:, 0])
    tok = sample(logits, rows.sampler, s.count, model.vocab_size, cfg.plain, s.penalties)
    count, penalties = s.count + 1, s.penalties
    if not cfg.plain:
        lp_out = jax.tree.map(lambda o, x: o.at[i].set(x), lp_out, token_logprobs(logits, tok, MAX_LOGPROBS))
        penalties = penalties._replace(counts=penalties.counts.at[jnp.arange(b), tok].add(jnp.where(s.done, 0, 1)))
    tok = jnp.where(s.done, -1, tok)
    done = s.done | _is_done(tok, count, rows)
    # A finished row keeps its state and re-runs its last token to the scratch page.
    nxt = DecodeState(jnp.where(s.done, s.tokens, tok), jnp.where(s.done, s.pos, s.pos + 1),
                      jnp.where(s.done, s.count, count), done, penalties)
    return _constrain_cache(cache, cfg.ops.mesh), nxt, out.at[i].set(tok), lp_out


def _take(tree, live, dp: int, fills=None):
    """Rows `live` [n] (each replica's own slot numbers; out of range: a padding row, given the
    `fills` values, default 0) of per-slot arrays [slots, ...]."""
    fills = jax.tree.map(lambda _: 0, tree) if fills is None else fills
    return jax.tree.map(lambda x, f: paged.per_replica(lambda a, i: a.at[i].get(mode="fill", fill_value=f),
                                                       dp, x, live), tree, fills)


def _put_back(tree, sub, live, dp: int):
    """`sub` (rows `live` of `tree`) written back into their slots; padding rows are dropped."""
    return jax.tree.map(lambda x, y: paged.per_replica(lambda a, i, v: a.at[i].set(v, mode="drop"), dp, x, live, y),
                        tree, sub)


@functools.partial(jax.jit, static_argnames=("model_def", "cfg"), donate_argnames=("cache", "state"))
def decode(model_def: ModelDef, weights, cache: KVCache, state: DecodeState, rows: Rows, table, live,
           cfg: StepConfig):
    """`cfg.steps` decode steps for the slots `live` [n] (each replica's own slot numbers, out
    of range for padding), slot b's keys and values in the pages of table[b] -> (Step [steps, n],
    state, cache). Only the live rows run: idle slots cost nothing."""
    TRACES["decode"] += 1
    model, dp = model_def.merge(weights), cfg.ops.dp
    idle = DecodeState(0, 0, 0, True, Penalties(False, 0))
    s = _take(state, live, dp, idle)
    r, tab = _take(rows, live, dp), _take(table, live, dp, SCRATCH_PAGE)
    n, steps = live.shape[0], cfg.steps
    out = jnp.full((steps, n), -1, jnp.int32)
    k = MAX_LOGPROBS
    lp_out = None if cfg.plain else TokenLogprobs(jnp.zeros((steps, n)), jnp.zeros((steps, n), jnp.int32),
                                                  jnp.zeros((steps, n, k), jnp.int32), jnp.zeros((steps, n, k)))
    body = functools.partial(_decode_step, model, r, tab, cfg)
    # A fixed trip count: no per-step predicate copy to the host; the host checks `done` per chunk.
    cache, s, out, lp_out = jax.lax.fori_loop(0, steps, body, (cache, s, out, lp_out))
    state = _put_back(state, s, live, dp)
    return Step(out, lp_out, state.done), state, cache


@jax.jit
def stop_rows(state: DecodeState, stop) -> DecodeState:
    return state._replace(done=state.done | stop)


@functools.partial(jax.jit, static_argnames=("model_def", "ops"))
def forward_logits(model_def: ModelDef, weights, tokens, ops: OpsConfig):
    """Full-sequence float32 logits [B, T, V_padded] for equal-length prompts (tests, scoring)."""
    TRACES["forward_logits"] += 1
    model = model_def.merge(weights)
    attn = model.model.layers[0].self_attn
    (rows, t), dp, size = tokens.shape, ops.dp, 16
    tokens = jnp.pad(tokens, ((0, -rows % dp), (0, 0)))        # each replica gets as many rows
    b = tokens.shape[0]
    width, local = -(-t // size), b // dp                       # pages per row, rows per replica
    table = 1 + (jnp.arange(b)[:, None] % local) * width + jnp.arange(width)[None, :]  # 0: scratch
    pp = ops.mesh.shape.get("pp", 1)
    n, k_shape, v_shape = kv_cache.shape(len(model.model.layers) * pp, dp * (local * width + 1),
                                         attn.num_kv_heads, size, attn.head_dim, pp)
    dtype = model.model.norm.weight[...].dtype
    cache = KVCache([jnp.zeros(k_shape, dtype)] * n, [jnp.zeros(v_shape, dtype)] * n)
    h, _ = model.hidden(tokens, _constrain_cache(cache, ops.mesh), jnp.zeros((b,), jnp.int32), table, ops)
    return model.logits(h[:rows])


class Chunk(NamedTuple):
    """A prefill row: positions [start, start + length) of seq's prompt (+ generated tokens)."""
    seq: Sequence
    start: int
    length: int

    @property
    def last(self) -> bool:
        return self.start + self.length == self.seq.target


def prefill_shapes(most_rows: int, row: int) -> list[tuple[int, int]]:
    """(packed tokens, rows) per replica of every prefill program: tokens in row_bucket's
    multiples of a row, with twice the rows they fill (each chunk pads its last row). Finer
    token counts pad less but compile more: with more programs than CPU cores, warm-up waits
    for a free core (docs/performance.md)."""
    return [(n * row, 2 * n) for n in row_buckets(most_rows)]


def _idle_prefill(n: int, t: int, width: int, packed: int, slots: int) -> PrefillBatch:
    """Host arrays of a prefill call of n padding rows of t tokens (they write only to the
    scratch page and sample nothing), `packed` tokens in all."""
    def zeros(*shape):  # each field its own array: _prefill_batch fills them in place
        return np.zeros(shape, np.int32)
    return PrefillBatch(zeros(n, t), zeros(n), zeros(n) + 1, zeros(n, width), zeros(n) + slots, np.zeros(n, bool),
                        zeros(n), zeros(n, t), zeros(packed), zeros(n, t), zeros(packed))


class Pending(NamedTuple):
    """Device work whose tokens the host has not read: its Step (tokens [steps, columns]), and
    each column's sequence, slot and run (admission count) when it was queued; for a prefill,
    each column's chunk."""
    step: Step
    prompt_logprobs: TokenLogprobs | None
    seqs: list[Sequence | None]
    slots: list[int]
    runs: list[int]
    chunks: list[Chunk] | None = None


class Column(NamedTuple):
    """One sequence's share of read work: its new tokens (and log-prob entries), whether its
    slot was done after the call, and new entries of its prompt's log-probs, if it asked."""
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
    """The device state: the KV page pool (`pages` pages of `page_size` tokens per dp replica),
    the decode state and sampling constants of `slots` decode rows, and each slot's block table
    (up to `max_len` positions). Prefill calls carry at most `prefill_rows` x `prefill_row`
    tokens per replica, in rows of `prefill_row` tokens (at most `max_prefill_rows`). It is
    told which chunks and slots run and decides nothing."""

    def __init__(self, model, slots: int, pages: int, page_size: int, max_len: int, prefill_row: int,
                 prefill_rows: int):
        cfg, self.model, dp = model.config, model, model.mesh.shape["dp"]
        self.slots, self.prefill_row, self.prefill_rows = slots, prefill_row, prefill_rows
        # Rows spanning whole pages write them whole (paged.write_pages): the scheduler then
        # starts every chunk, so every row, on a page boundary.
        self.page_size, self.whole_pages = page_size, prefill_row % page_size == 0
        self.prefill_shapes = prefill_shapes(prefill_rows, prefill_row)
        self.max_prefill_rows = self.prefill_shapes[-1][1]
        self.width = -(-max_len // page_size)  # block-table entries per sequence
        self.cache = kv_cache.init(cfg.num_layers, pages * dp, model.kv_heads, page_size, cfg.head_dim,
                                   model.cache_dtype, model.mesh)
        self.per_row = NamedSharding(model.mesh, ROWS_SPEC)
        idle = SamplingParams(max_tokens=1, temperature=0.0)
        self.host_rows = Rows.build([idle] * slots, [0] * slots, [[]] * slots)
        self.rows = self._put(self.host_rows)
        self.state = self._put(DecodeState.idle(slots, model.padded_vocab))
        self.host_table = np.zeros((slots, self.width), np.int32)
        self.table = None  # on device, re-sent when host_table changes

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

    def set_table(self, slot: int, pages: list[int]) -> None:
        """Slot's block table: these pages, scratch past them."""
        row = np.zeros(self.width, np.int32)
        row[:len(pages)] = pages
        if not np.array_equal(row, self.host_table[slot]):
            self.host_table[slot] = row
            self.table = None

    def stop(self, slots: list[int]) -> None:
        """Mark these slots done, so queued decode work leaves them alone."""
        mask = np.zeros(self.slots, bool)
        mask[slots] = True
        self.state = stop_rows(self.state, self._put(mask))

    def prefill(self, chunks: list[Chunk]) -> Pending:
        """Queue one prefill call over `chunks` (a run's first chunks, after any cached prefix,
        also set their slots' rows)."""
        firsts = [c.seq for c in chunks if c.start == c.seq.cached]
        if firsts:
            self._set_rows(firsts, [s.slot for s in firsts])
        batch, rows = self._prefill_batch(chunks)
        seqs = [c.seq for c in chunks]
        cfg = StepConfig(self.model.ops, all(c.seq.params.plain for c in chunks),
                         logprob_bucket(s.params.prompt_logprobs for s in seqs))
        step, prompt_lp = self._run_prefill(batch, cfg)
        step = step._replace(tokens=step.tokens[None], logprobs=jax.tree.map(lambda x: x[None], step.logprobs))
        return Pending(step, prompt_lp, [c and c.seq for c in rows], [c.seq.slot if c else 0 for c in rows],
                       [c.seq.runs if c else -1 for c in rows], rows)

    def _run_prefill(self, batch: PrefillBatch, cfg: StepConfig):
        """The jitted prefill on the device state (the one call site, warm-up's too)."""
        step, prompt_lp, self.state, self.cache = prefill(*self._prefill_args(batch, cfg))
        return step, prompt_lp

    def _prefill_args(self, batch: PrefillBatch, cfg: StepConfig) -> tuple:
        return (*self.model.step_args, self.cache, self.state, self.rows, self._put(batch), cfg)

    def _run_decode(self, live: np.ndarray, cfg: StepConfig) -> Step:
        """The jitted decode on the device state (the one call site, warm-up's too)."""
        step, self.state, self.cache = decode(*self._decode_args(live, cfg))
        return step

    def _decode_args(self, live: np.ndarray, cfg: StepConfig) -> tuple:
        if self.table is None:
            self.table = self._put(self.host_table)
        return (*self.model.step_args, self.cache, self.state, self.rows, self.table, self._put(live), cfg)

    def _cut(self, chunks: list[Chunk]) -> list[list[Chunk]]:
        """Each replica's prefill rows: chunks cut into rows of `prefill_row` tokens."""
        cut = [Chunk(c.seq, at, min(self.prefill_row, c.start + c.length - at))
               for c in chunks for at in range(c.start, c.start + c.length, self.prefill_row)]
        return [[c for c in cut if c.seq.replica == r] for r in range(self.model.mesh.shape["dp"])]

    def prefill_shape(self, chunks: list[Chunk]) -> tuple[int, int]:
        """(packed tokens, rows) per replica of the program that runs `chunks`."""
        return self._shape(self._cut(chunks))

    def _shape(self, per: list[list[Chunk]]) -> tuple[int, int]:
        """The smallest of prefill_shapes that holds each replica's rows `per`."""
        tokens, rows = max(sum(c.length for c in g) for g in per), max(map(len, per))
        return next(s for s in self.prefill_shapes if s[0] >= tokens and s[1] >= rows)

    def _prefill_batch(self, chunks: list[Chunk]) -> tuple[PrefillBatch, list[Chunk | None]]:
        """Host arrays of a prefill call, and the chunk each row holds (None: padding). Chunks are
        cut into rows of `prefill_row` tokens (a row's queries attend to the pages its sequence's
        earlier rows write in the same call); only a chunk's last row pads, and the projections
        run on the tokens packed (each replica's in its share)."""
        per = self._cut(chunks)
        size, local = self._shape(per)
        rows = [g[i] if i < len(g) else None for g in per for i in range(local)]
        n, t, dp = len(rows), self.prefill_row, self.model.mesh.shape["dp"]
        # XLA's attention reads the whole table: give it the pages this call reaches (a power of
        # two); the Pallas kernel stops at each query's position, so it keeps one shape.
        width = self.width if self.model.ops.kernels == "pallas" else min(
            self.width, bucket(max(len(c.seq.pages) for c in chunks)))
        batch = _idle_prefill(n, t, width, dp * size, self.slots)
        used = [0] * dp  # packed tokens per replica so far
        for i, c in enumerate(rows):
            if c is None:
                continue
            if self.whole_pages and c.start % self.page_size:
                raise AssertionError(f"a prefill row starts at {c.start}, inside a page of {self.page_size}")
            ids, (r, j), at = c.seq.ids(c.start, c.start + c.length + 1), divmod(i, local), np.arange(c.length)
            batch.tokens[i, :c.length], batch.targets[i, :len(ids) - 1] = ids[:c.length], ids[1:]
            batch.starts[i], batch.lens[i], batch.prompt_lens[i] = c.start, c.length, len(c.seq.prompt)
            batch.table[i, :len(c.seq.pages)] = c.seq.pages
            batch.slots[i], batch.sample[i] = c.seq.slot, c.last
            first = r * size + used[r]
            batch.packed[first:first + c.length], batch.pack[first:first + c.length] = ids[:c.length], j * t + at
            batch.unpack[i] = used[r] + np.minimum(np.arange(t), c.length - 1)  # padding: the last token's
            used[r] += c.length
        return batch, rows

    def _set_rows(self, seqs: list[Sequence], slots: list[int]) -> None:
        """The new sequences' sampling constants into their slots."""
        new = Rows.build([s.params for s in seqs], [s.seed for s in seqs], [s.stop_ids for s in seqs],
                         [s.index for s in seqs])
        self.host_rows = jax.tree.map(lambda all_, x: _set_rows(all_, slots, x), self.host_rows, new)
        self.rows = self._put(self.host_rows)

    def decode(self, columns: list[Sequence | None], steps: int) -> Pending:
        """Queue `steps` decode steps over the slots that hold a sequence; columns[i] is slot i's."""
        live, where = self._live([i for i, s in enumerate(columns) if s is not None])
        cfg = StepConfig(self.model.ops, all(s.params.plain for s in columns if s is not None), steps=steps)
        step = self._run_decode(live, cfg)
        seqs = [None if w is None else columns[w] for w in where]
        return Pending(step, None, seqs, [w or 0 for w in where], [-1 if s is None else s.runs for s in seqs])

    def _live(self, slots: list[int]) -> tuple[np.ndarray, list[int | None]]:
        """Decode rows for these slots: each replica's own slot numbers (out of range: padding),
        as many per replica (a bucket), and each row's slot (None: padding)."""
        dp = self.model.mesh.shape["dp"]
        per = self.slots // dp
        groups = [[s - r * per for s in slots if s // per == r] for r in range(dp)]
        live = np.full((dp, row_bucket(max(map(len, groups)), per)), per, np.int32)
        for r, g in enumerate(groups):
            live[r, :len(g)] = g
        return live.reshape(-1), [r * per + int(i) if i < per else None for r in range(dp) for i in live[r]]

    def warmup(self, steps: int, progress=None, every_variant: bool = True, threads: int | None = None) -> int:
        """Compile every prefill and decode program this runner can call, then run each once with
        idle rows (they write only to the scratch page), so none compiles later; returns how
        many. The variants (StepConfig): plain or not, and prefill also with and without prompt
        log-probs; every_variant=False: only plain, without prompt log-probs. Programs
        are traced one by one (Python) and compiled by XLA on `threads` threads at once
        (default: one per CPU core); jit's cache keeps what they compile."""
        variants = self._variants(steps, every_variant)
        self.stop([])
        with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count()) as pool:
            compiled = [pool.submit(prefill.lower(*self._prefill_args(x, cfg)).compile) if kind == "prefill" else
                        pool.submit(decode.lower(*self._decode_args(x, cfg)).compile) for kind, _, cfg, x in variants]
            for i, (done, (kind, n, cfg, _)) in enumerate(zip(compiled, variants)):
                done.result()
                if progress:
                    extra = " sampled" * (not cfg.plain) + " prompt log-probs" * (cfg.prompt_logprobs is not None)
                    progress(i + 1, len(variants), f"{kind} {n}{extra}")
        for kind, _, cfg, x in variants:
            if kind == "prefill":
                self._run_prefill(x, cfg)
            else:
                self._run_decode(x, cfg)
            jax.block_until_ready(self.cache)
        return len(variants)

    def _variants(self, steps: int, every_variant: bool) -> list[tuple]:
        """(kind, its size per replica (prefill: "N tokens", decode: "xN" rows), StepConfig, the
        host input with idle rows) of every program warmup compiles."""
        dp, per = self.model.mesh.shape["dp"], self.slots // self.model.mesh.shape["dp"]
        width = self.width if self.model.ops.kernels == "pallas" else 1
        ops, more, out = self.model.ops, 1 + every_variant, []
        for plain, k in itertools.product((True, False)[:more], (None, MAX_LOGPROBS)[:more]):
            for size, n in self.prefill_shapes:
                batch = _idle_prefill(dp * n, self.prefill_row, width, dp * size, self.slots)
                out.append(("prefill", f"{size} tokens", StepConfig(ops, plain, k), batch))
        for plain in (True, False)[:more]:
            out += [("decode", f"x{n}", StepConfig(ops, plain, steps=steps), np.full(dp * n, per, np.int32))
                    for n in row_buckets(per)]
        return out

    def read(self, pending: list[Pending]) -> list[Column]:
        """Wait for queued work (one fetch for all of it): each live sequence's share, in order.
        Work queued for a run of a sequence that has since been preempted is dropped."""
        out, vocab = [], self.model.config.vocab_size  # top-k past the vocabulary: padding, dropped
        wanted = [(p.step if any(s is not None and s.params.logprobs is not None for s in p.seqs)
                   else p.step._replace(logprobs=None), p.prompt_logprobs) for p in pending]
        for p, (step, prompt_lp) in zip(pending, distributed.fetch(wanted)):
            for col, (seq, slot, run) in enumerate(zip(p.seqs, p.slots, p.runs)):
                if seq is None or seq.status is not Status.RUNNING or seq.runs != run:
                    continue
                chunk = None if p.chunks is None else p.chunks[col]
                k, at = seq.params.logprobs, np.nonzero(step.tokens[:, col] >= 0)[0]
                lps = [] if k is None else [_entry(step.logprobs, (j, col), min(k, vocab)) for j in at]
                done = bool(step.done[slot]) if chunk is None or chunk.last else False
                prompt = None if chunk is None else self._prompt_entries(prompt_lp, chunk, col)
                out.append(Column(seq, step.tokens[at, col].tolist(), lps, done, prompt))
        return out

    def _prompt_entries(self, prompt_lp, chunk: Chunk, row: int) -> list[tuple] | None:
        """The prompt log-prob entries this chunk adds (positions the sequence lacks)."""
        seq, k = chunk.seq, chunk.seq.params.prompt_logprobs
        if prompt_lp is None or k is None:
            return None
        have = len(seq.prompt_logprobs or [])
        end = min(chunk.start + chunk.length, len(seq.prompt) - 1)
        return [_entry(prompt_lp, (row, j - chunk.start), min(k, self.model.config.vocab_size))
                for j in range(max(have, chunk.start), end)]
