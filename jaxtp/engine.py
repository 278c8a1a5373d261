"""The hot path: jitted prefill and multi-token decode over a slot-based KV cache, and the
`Engine` that schedules sequences onto the slots (continuous batching).

The cache has a fixed number of rows ("slots"). Prefill runs a group of new prompts and writes
their keys/values into free slots; decode advances every slot `steps` tokens in an on-device loop
(finished and empty slots idle in place). The host keeps one chunk queued ahead: while the device
runs it, the host reads the chunk before, frees the slots of finished sequences and prefills
waiting ones into them. Shapes are bucketed (prompt group size and length to powers of two) so
a run compiles a handful of programs once; the cache is donated so XLA updates it in place.

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
from jax.sharding import Mesh, NamedSharding

from jaxtp import allreduce, decode_ops, distributed, kv_cache
from jaxtp.kv_cache import KVCache
from jaxtp.sampling import (MAX_LOGPROBS, Penalties, SamplerArrays, SamplingParams, TokenLogprobs,
                            sample, token_logprobs)
from jaxtp.sharding import ROWS_SPEC

CACHE_BUCKET = 128  # cache lengths are rounded up to this, to bound the number of compiled shapes

# Number of times each jitted function was traced (a trace precedes every compilation).
TRACES: collections.Counter = collections.Counter()


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
    tokens: jax.Array   # last sampled token, not yet in the cache
    pos: jax.Array      # where `tokens` will be written
    count: jax.Array    # tokens generated so far
    done: jax.Array
    penalties: Penalties | None = None

    @classmethod
    def idle(cls, slots: int) -> "DecodeState":
        """Host arrays for `slots` empty slots (done, so decode leaves them alone)."""
        return cls(*(np.zeros(slots, np.int32) for _ in range(3)), np.ones(slots, bool))


class Step(NamedTuple):
    """What a prefill or decode call produced: tokens [..., B] (-1 where a row was already done),
    if asked for, their log-probabilities, and every slot's done flag after the call (apart from
    the state, which the next call takes over: the host reads this one later)."""
    tokens: jax.Array
    logprobs: TokenLogprobs | None
    done: jax.Array


def _constrain_cache(cache: KVCache, mesh: Mesh) -> KVCache:
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, kv_cache.cache_sharding(mesh, x.ndim)),
                        cache)


def _is_done(tok, count, rows: Rows):
    stop = jnp.any(tok[:, None] == rows.sampler.stop_ids, axis=-1) & (count >= rows.sampler.min_tokens)
    return stop | (count >= rows.max_tokens)


def _logprobs(logits, tok, k):
    return None if k is None else token_logprobs(logits, tok, k)


class ModelDef:
    """The static half of a model for the jitted steps: its nnx GraphDef and the treedef of its
    weights, hashed once. jit hashes static arguments and flattens the others on every call; an
    nnx GraphDef's hash walks the whole module tree and an nnx.State flattens in Python per leaf,
    together ~1.6 ms per call for 32 layers (CPU host), where (ModelDef, flat list of arrays)
    dispatches in ~0.1 ms. Decode runs a call per chunk of 16-32 tokens, so this is per-token
    latency."""

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


@functools.partial(jax.jit, static_argnames=("model_def", "mesh", "greedy", "min_tokens", "logprobs",
                                    "prompt_logprobs", "all_reduce", "kernels"),
                   donate_argnames=("cache", "state"))
def prefill(model_def: ModelDef, weights, cache: KVCache, state: DecodeState, rows: Rows, tokens, lens, slots, *,
            mesh, greedy, min_tokens=False, logprobs=None, prompt_logprobs=None, all_reduce="xla",
            kernels="xla"):
    """Prompts tokens [n, T] (right-padded; true lengths lens) into cache rows `slots` (a slot out
    of range marks a padding row, which is dropped). Samples each prompt's first token.

    Returns (Step [n], prompt TokenLogprobs [n, T-1] or None, state, cache).
    """
    TRACES["prefill"] += 1
    model = model_def.merge(weights)
    (n, t), (b, kvh, _, hd) = tokens.shape, cache.k[0].shape[-4:]
    layers, stages = len(cache.k), cache.k[0].shape[:-4]  # stages: () or (pp,)
    fresh = jnp.zeros((*stages, n, kvh, t, hd), cache.k[0].dtype)
    with allreduce.use(mesh, all_reduce), decode_ops.use(mesh, kernels):
        h, new = model.hidden(tokens, _constrain_cache(KVCache([fresh] * layers, [fresh] * layers), mesh),
                              jnp.zeros((n,), jnp.int32))
    put = lambda c, x: c.at[..., slots, :, :t, :].set(x, mode="drop")  # noqa: E731
    cache = KVCache(list(map(put, cache.k, new.k)), list(map(put, cache.v, new.v)))

    r = jax.tree.map(lambda x: x[jnp.minimum(slots, b - 1)], rows)
    logits = model.logits(h[jnp.arange(n), lens - 1])
    penalties = None
    if state.penalties is not None:
        valid = (jnp.arange(t)[None, :] < lens[:, None]).astype(jnp.int32)
        seen = jnp.zeros(logits.shape, jnp.int32).at[jnp.arange(n)[:, None], tokens].add(valid)
        penalties = Penalties(seen > 0, jnp.zeros(logits.shape, jnp.int32))
    zero = jnp.zeros((n,), jnp.int32)
    tok = sample(logits, r.sampler, zero, model.vocab_size, greedy, penalties, min_tokens)
    if penalties is not None:
        penalties = penalties._replace(counts=penalties.counts.at[jnp.arange(n), tok].add(1))
    prompt_lp = None
    if prompt_logprobs is not None:
        prompt_lp = token_logprobs(model.logits(h[:, :-1]), tokens[:, 1:], prompt_logprobs)

    new_rows = DecodeState(tok, lens, zero + 1, _is_done(tok, zero + 1, r), penalties)
    state = jax.tree.map(lambda old, x: old.at[slots].set(x, mode="drop"), state, new_rows)
    return Step(tok, _logprobs(logits, tok, logprobs), state.done), prompt_lp, state, _constrain_cache(cache, mesh)


@functools.partial(jax.jit, static_argnames=("model_def", "mesh", "greedy", "min_tokens", "steps", "logprobs",
                                    "all_reduce", "kernels"),
                   donate_argnames=("cache", "state"))
def decode(model_def: ModelDef, weights, cache: KVCache, state: DecodeState, rows: Rows, *, mesh, greedy, steps,
           min_tokens=False, logprobs=None, all_reduce="xla", kernels="xla"):
    """`steps` decode steps for every slot on device -> (Step [steps, B], state, cache)."""
    TRACES["decode"] += 1
    model = model_def.merge(weights)
    b = state.tokens.shape[0]
    out = jnp.full((steps, b), -1, jnp.int32)
    k = 0 if logprobs is None else logprobs
    lp_out = TokenLogprobs(jnp.zeros((steps, b)), jnp.zeros((steps, b), jnp.int32),
                           jnp.zeros((steps, b, k), jnp.int32), jnp.zeros((steps, b, k)))

    def body(i, carry):
        cache, s, out, lp_out = carry
        with allreduce.use(mesh, all_reduce), decode_ops.use(mesh, kernels):
            h, cache = model.hidden(s.tokens[:, None], cache, s.pos)
        logits = model.logits(h[:, 0])
        tok = sample(logits, rows.sampler, s.count, model.vocab_size, greedy, s.penalties, min_tokens)
        if logprobs is not None:
            lp_out = jax.tree.map(lambda o, x: o.at[i].set(x), lp_out, token_logprobs(logits, tok, k))
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
        return _constrain_cache(cache, mesh), nxt, out.at[i].set(tok), lp_out

    # A fixed trip count: no per-step predicate copy to the host; the host checks `done` per chunk.
    cache, state, out, lp_out = jax.lax.fori_loop(0, steps, body, (cache, state, out, lp_out))
    return Step(out, lp_out if logprobs is not None else None, state.done), state, cache


@jax.jit
def _stop_rows(state: DecodeState, stop) -> DecodeState:
    return state._replace(done=state.done | stop)


@functools.partial(jax.jit, static_argnames=("model_def", "mesh", "all_reduce", "kernels"))
def forward_logits(model_def: ModelDef, weights, tokens, *, mesh, all_reduce="xla", kernels="xla"):
    """Full-sequence float32 logits [B, T, V_padded] for equal-length prompts (tests, scoring)."""
    TRACES["forward_logits"] += 1
    model = model_def.merge(weights)
    attn = model.model.layers[0].self_attn
    b, t = tokens.shape
    pp = mesh.shape.get("pp", 1)
    n, shape = kv_cache.shape(len(model.model.layers) * pp, b, attn.num_kv_heads, t, attn.head_dim, pp)
    dtype = model.model.norm.weight[...].dtype
    cache = KVCache([jnp.zeros(shape, dtype)] * n, [jnp.zeros(shape, dtype)] * n)
    with allreduce.use(mesh, all_reduce), decode_ops.use(mesh, kernels):
        h, _ = model.hidden(tokens, _constrain_cache(cache, mesh), jnp.zeros((b,), jnp.int32))
    return model.logits(h)


def bucket(n: int, minimum: int = 1) -> int:
    """Next power of two >= n (and >= minimum)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(eq=False)
class Sequence:
    """One sequence to generate (a request with n samples has n). The engine appends to `tokens`
    (and `logprobs`) and sets `finish_reason` ("stop" | "length" | "abort")."""
    prompt: list[int]
    params: SamplingParams
    seed: int
    index: int = 0
    stop_ids: list[int] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[tuple] = dataclasses.field(default_factory=list)  # (logprob, rank, top_ids, top_lps)
    prompt_logprobs: list[tuple] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    slot: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _Pending(NamedTuple):
    """Device work whose tokens the host has not read: its Step (tokens [steps, columns]), and
    the sequence and slot of each column when it was queued."""
    step: Step
    prompt_logprobs: TokenLogprobs | None
    seqs: list[Sequence | None]
    slots: list[int]


class Engine:
    """Continuous batching over `slots` cache rows of `max_len` tokens each.

    `add` queues a sequence; each `step` prefills waiting sequences into free slots (at most
    `max_prefill_tokens` padded prompt tokens per prefill call) and queues one decode chunk of
    `chunk` tokens, returning the sequences that got new tokens (from the chunk queued by the
    step before, and this step's prefill). `finish` ends a sequence from the host (a stop
    string matched, a client went away) and frees its slot. With data parallelism `slots` must
    be a multiple of dp (each replica holds slots/dp of them).
    """

    def __init__(self, model, slots: int, max_len: int, chunk: int = 16, max_prefill_tokens: int = 8192):
        cfg, self.model, self.mesh = model.config, model, model.mesh
        self.dp = self.mesh.shape["dp"]
        if slots % self.dp:
            raise ValueError(f"slots={slots} must be a multiple of data_parallel_size={self.dp}")
        self.slots, self.chunk, self.max_prefill_tokens = slots, chunk, max_prefill_tokens
        self.max_len = round_up(max_len, CACHE_BUCKET)
        self.eos = list(cfg.eos_token_ids)
        self.cache = kv_cache.init(cfg.num_layers, slots, model.kv_heads, self.max_len, cfg.head_dim,
                                   model.dtype, self.mesh)
        self.per_row = NamedSharding(self.mesh, ROWS_SPEC)
        idle = SamplingParams(max_tokens=1, temperature=0.0)
        self.host_rows = Rows.build([idle] * slots, [0] * slots, [[]] * slots)
        self.rows = self._put(self.host_rows)
        self.state = self._put(DecodeState.idle(slots))
        self.running: list[Sequence | None] = [None] * slots
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._stopped = np.zeros(slots, bool)
        self._ahead: _Pending | None = None  # the decode chunk queued by the last step, unread

    def _put(self, tree):
        """Per-row host arrays -> device, split on dp."""
        return distributed.put(tree, self.per_row)

    def add(self, seq: Sequence) -> None:
        if len(seq.prompt) + seq.params.max_tokens > self.max_len:
            raise ValueError(f"prompt of {len(seq.prompt)} tokens + max_tokens={seq.params.max_tokens} "
                             f"exceeds the engine's maximum length of {self.max_len} tokens")
        seq.stop_ids = list(seq.params.stop_token_ids) + ([] if seq.params.ignore_eos else self.eos)
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        """End `seq` from the host; its slot is freed before the next decode chunk."""
        if seq.finished:
            return
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq.slot is not None:
            self._stopped[seq.slot] = True
            self.running[seq.slot], seq.slot = None, None

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.running)

    def step(self) -> list[Sequence]:
        """Admit waiting sequences, queue one decode chunk, and read the chunk queued by the call
        before (and this call's prefill); returns the sequences that got tokens or finished.

        The device always has the next chunk queued while the host reads the last one's tokens,
        so it runs chunk after chunk without waiting for the host's dispatch and bookkeeping
        (Llama-2-7B, tp 1, batch 1, 16-step chunks, one H200: 3.94 -> 3.81 ms/token in
        scripts/benchmark.py, --chunks sync vs queued; scripts/gpu/NOTES.md, session 7). A queued
        chunk runs rows the host has not yet seen finish; they idle in place (done rows re-run
        their last token), and tokens of sequences finished meanwhile are dropped.
        """
        if self._stopped.any():
            self.state = _stop_rows(self.state, self._put(self._stopped))
            self._stopped[:] = False
        prefill = self._admit()
        ready, self._ahead = self._ahead, self._launch(prefill)
        return self._collect(([] if ready is None else [ready]) + ([] if prefill is None else [prefill]))

    def _launch(self, prefill: "_Pending | None") -> "_Pending | None":
        """Queue a decode chunk over every slot, unless each running sequence will have all its
        tokens once the work already queued is read (and something is queued)."""
        queued = collections.Counter()  # tokens per sequence in work the host has not read yet
        for p in (self._ahead, prefill):
            for seq in p.seqs if p is not None else ():
                queued[id(seq)] += p.step.tokens.shape[0]
        active = [s for s in self.running if s is not None]
        if not active or (queued and all(len(s.tokens) + queued[id(s)] >= s.params.max_tokens for s in active)):
            return None
        step, self.state, self.cache = decode(
            *self.model.step_args, self.cache, self.state, self.rows,
            mesh=self.mesh, steps=self.chunk, all_reduce=self.model.all_reduce,
            kernels=self.model.kernels, **_static(active))
        return _Pending(step, None, list(self.running), list(range(self.slots)))

    def _collect(self, pending: "list[_Pending]") -> list[Sequence]:
        """Read queued work (one fetch for all of it) and record each sequence's tokens in order."""
        changed: dict[int, Sequence] = {}
        read = distributed.fetch([(p.step, p.prompt_logprobs) for p in pending])
        for p, (step, prompt_lp) in zip(pending, read):
            for col, (seq, slot) in enumerate(zip(p.seqs, p.slots)):
                if seq is None or seq.finished:
                    continue
                if prompt_lp is not None and seq.params.prompt_logprobs is not None:
                    seq.prompt_logprobs = [_entry(prompt_lp, (col, j), seq.params.prompt_logprobs)
                                           for j in range(len(seq.prompt) - 1)]
                at = np.nonzero(step.tokens[:, col] >= 0)[0]
                self._record(seq, step, at, col, step.done[slot])
                if len(at) or seq.finished:
                    changed[id(seq)] = seq
        return list(changed.values())

    def _admit(self) -> "_Pending | None":
        """Prefill waiting sequences into free slots; their first tokens are read with the next
        collect."""
        free = [i for i, s in enumerate(self.running) if s is None]
        group: list[Sequence] = []
        while self.waiting and len(group) < len(free):
            t = bucket(max(len(s.prompt) for s in group + [self.waiting[0]]), 16)
            if group and bucket(len(group) + 1) * t > self.max_prefill_tokens:
                break
            group.append(self.waiting.popleft())
        if not group:
            return None
        for seq, slot in zip(group, free):
            seq.slot, self.running[slot] = slot, seq
        slots = [s.slot for s in group]
        self.host_rows = jax.tree.map(lambda all_, new: _set_rows(all_, slots, new), self.host_rows,
                                      Rows.build([s.params for s in group], [s.seed for s in group],
                                                 [s.stop_ids for s in group], [s.index for s in group]))
        self.rows = self._put(self.host_rows)
        if self.state.penalties is None and any(s.params.penalized for s in group):
            v = self.model.padded_vocab
            self.state = self.state._replace(penalties=self._put(
                Penalties(np.zeros((self.slots, v), bool), np.zeros((self.slots, v), np.int32))))

        n = round_up(bucket(len(group)), self.dp)
        t = min(bucket(max(len(s.prompt) for s in group), 16), self.max_len)
        tokens = np.zeros((n, t), np.int32)
        for i, s in enumerate(group):
            tokens[i, : len(s.prompt)] = s.prompt
        lens = np.array([len(s.prompt) for s in group] + [1] * (n - len(group)), np.int32)
        slot_ids = np.array(slots + [self.slots] * (n - len(group)), np.int32)
        want_prompt_lp = [s.params.prompt_logprobs for s in group if s.params.prompt_logprobs is not None]
        step, prompt_lp, self.state, self.cache = prefill(
            *self.model.step_args, self.cache, self.state, self.rows,
            *self._put((tokens, lens, slot_ids)), mesh=self.mesh, all_reduce=self.model.all_reduce,
            kernels=self.model.kernels,
            **_static(group),
            prompt_logprobs=_logprob_bucket(want_prompt_lp) if want_prompt_lp else None)
        step = step._replace(tokens=step.tokens[None], logprobs=jax.tree.map(lambda x: x[None], step.logprobs))
        return _Pending(step, prompt_lp, group, slots)  # one step: tokens [1, n]

    def _record(self, seq: Sequence, step, at, col: int, done: bool) -> None:
        for j in at:
            seq.tokens.append(int(step.tokens[j, col]))
            if seq.params.logprobs is not None:
                seq.logprobs.append(_entry(step.logprobs, (j, col), seq.params.logprobs))
        if done and not seq.finished:
            last = seq.tokens[-1]
            stopped = last in seq.stop_ids and len(seq.tokens) >= seq.params.min_tokens
            seq.finish_reason = "stop" if stopped else "length"
            seq.stop_reason = last if stopped and last not in self.eos else None
            self.running[seq.slot], seq.slot = None, None


def _static(seqs: list[Sequence]) -> dict:
    """The compile-time switches a group of sequences needs (each variant compiles once)."""
    return dict(greedy=all(s.params.greedy for s in seqs),
                min_tokens=any(s.params.min_tokens > 0 for s in seqs),
                logprobs=_logprob_bucket(s.params.logprobs for s in seqs))


def _logprob_bucket(ks) -> int | None:
    """The static top-k for a group: None if nobody asked, else the next power of two."""
    ks = [k for k in ks if k is not None]
    return None if not ks else (0 if max(ks) == 0 else min(bucket(max(ks)), bucket(MAX_LOGPROBS)))


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


def slots_that_fit(model, slots: int, max_len: int) -> int:
    """About `slots` cache rows of `max_len` tokens: a multiple of dp (each replica gets as many),
    no more than the KV capacity sized at load holds (`Model.max_kv_tokens` per replica, from
    memory_fraction), at least one per replica."""
    dp = model.mesh.shape["dp"]
    per_replica = -(-slots // dp)
    capacity = getattr(model, "max_kv_tokens", None)
    if capacity is not None:
        per_replica = min(per_replica, capacity // round_up(max_len, CACHE_BUCKET))
    return dp * max(1, per_replica)


MAX_SLOTS = 256  # concurrent sequences at most (vLLM's max_num_seqs); more prompts queue


def run(model, seqs: list[Sequence], chunk: int = 16, max_slots: int = MAX_SLOTS):
    """Generate `seqs` to completion; yields (engine, sequences that changed) after every engine
    step, so callers can stream. The engine gets a slot per sequence where memory allows (up to
    max_slots, vLLM's max_num_seqs); the rest wait for free slots."""
    max_len = max(len(s.prompt) + s.params.max_tokens for s in seqs)
    engine = Engine(model, slots_that_fit(model, min(bucket(len(seqs)), max_slots), max_len), max_len, chunk)
    for s in seqs:
        engine.add(s)
    while engine.has_unfinished:
        yield engine, engine.step()
