"""The scheduler: which sequences get cache slots, when a decode chunk is queued, and what each
sequence's tokens and finish are (continuous batching). It decides; engine.runner executes.

Each step admits waiting sequences into free slots (one prefill), queues the next decode chunk
over every slot, and only then reads the chunk queued by the step before: the device runs chunk
after chunk while the host records tokens, frees slots and schedules. A queued chunk runs rows
the host has not yet seen finish; they idle in place, and tokens of sequences finished
meanwhile are dropped.
"""
from __future__ import annotations

import collections

from jaxtp.engine.runner import CACHE_BUCKET, Column, ModelRunner, Pending, bucket, round_up
from jaxtp.engine.sequence import Sequence, Status


class Engine:
    """Continuous batching over `slots` cache rows of `max_len` tokens each.

    `add` queues a sequence; each `step` prefills waiting sequences into free slots (at most
    `max_prefill_tokens` padded prompt tokens per prefill call) and queues one decode chunk of
    `chunk` tokens, returning the sequences that got new tokens (from the chunk queued by the
    step before, and this step's prefill). `abort` (a client went away) and `stop` (a stop
    string matched) end a sequence from the host and free its slot. With data parallelism
    `slots` must be a multiple of dp (each replica holds slots/dp of them).
    """

    def __init__(self, model, slots: int, max_len: int, chunk: int = 16, max_prefill_tokens: int = 8192):
        dp = model.mesh.shape["dp"]
        if slots % dp:
            raise ValueError(f"slots={slots} must be a multiple of data_parallel_size={dp}")
        self.runner = ModelRunner(model, slots, max_len)
        self.slots, self.max_len = slots, self.runner.max_len
        self.chunk, self.max_prefill_tokens = chunk, max_prefill_tokens
        self.eos = list(model.config.eos_token_ids)
        self.running: list[Sequence | None] = [None] * slots
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._freed: list[int] = []          # slots freed from the host since the last step
        self._ahead: Pending | None = None   # the decode chunk queued by the last step, unread

    def add(self, seq: Sequence) -> None:
        if len(seq.prompt) + seq.params.max_tokens > self.max_len:
            raise ValueError(f"prompt of {len(seq.prompt)} tokens + max_tokens={seq.params.max_tokens} "
                             f"exceeds the engine's maximum length of {self.max_len} tokens")
        seq.stop_ids = list(seq.params.stop_token_ids) + ([] if seq.params.ignore_eos else self.eos)
        self.runner.check(seq)
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        """End `seq` ("abort"); its slot is freed before the next decode chunk."""
        if not seq.finished:
            self._end(seq, "abort")

    def stop(self, seq: Sequence, stop_str: str, num_tokens: int) -> None:
        """A stop string ended `seq` at its first `num_tokens` tokens. It wins over a finish the
        device reported in the same chunk."""
        del seq.tokens[num_tokens:], seq.logprobs[num_tokens:]
        if seq.finished:
            seq.finish("stop", stop_str)
        else:
            self._end(seq, "stop", stop_str)

    def _end(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        if seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        elif seq.slot is not None:
            self._freed.append(seq.slot)
            self.running[seq.slot] = None
        seq.finish(reason, stop_reason)

    @property
    def kv_usage(self) -> float:
        """Share of the cache's token capacity that running sequences hold."""
        held = sum(len(s.prompt) + len(s.tokens) for s in self.running if s is not None)
        return held / (self.slots * self.max_len)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.running)

    def step(self) -> list[Sequence]:
        """Admit waiting sequences, queue one decode chunk, and read the chunk queued by the call
        before (and this call's prefill); returns the sequences that got tokens or finished."""
        if self._freed:
            self.runner.stop(self._freed)
            self._freed = []
        prefill = self._admit()
        ready, self._ahead = self._ahead, self._launch(prefill)
        return self._collect([p for p in (ready, prefill) if p is not None])

    def _admit(self) -> Pending | None:
        """Prefill waiting sequences into free slots, as many as fit one prefill call's budget;
        their first tokens are read with the next collect."""
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
            seq.run_in(slot)
            self.running[slot] = seq
        return self.runner.prefill(group, free[:len(group)])

    def _launch(self, prefill: Pending | None) -> Pending | None:
        """Queue a decode chunk over every slot, unless each running sequence will have all its
        tokens once the work already queued is read (and something is queued)."""
        queued = collections.Counter()  # tokens per sequence in work the host has not read yet
        for p in (self._ahead, prefill):
            for seq in p.seqs if p is not None else ():
                queued[id(seq)] += p.step.tokens.shape[0]
        active = [s for s in self.running if s is not None]
        if not active or (queued and all(len(s.tokens) + queued[id(s)] >= s.params.max_tokens for s in active)):
            return None
        return self.runner.decode(self.running, self.chunk)

    def _collect(self, pending: list[Pending]) -> list[Sequence]:
        """Read queued work and record each sequence's tokens in order."""
        changed: dict[int, Sequence] = {}
        for col in self.runner.read(pending):
            self._record(col)
            if col.tokens or col.seq.finished:
                changed[id(col.seq)] = col.seq
        return list(changed.values())

    def _record(self, col: Column) -> None:
        seq = col.seq
        if col.prompt_logprobs is not None:
            seq.prompt_logprobs = col.prompt_logprobs
        seq.tokens += col.tokens
        seq.logprobs += col.logprobs
        if col.done and not seq.finished:  # the device ended it: a stop token or max_tokens
            last = seq.tokens[-1]
            stopped = last in seq.stop_ids and len(seq.tokens) >= seq.params.min_tokens
            self.running[seq.slot] = None
            seq.finish("stop" if stopped else "length", last if stopped and last not in self.eos else None)


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
