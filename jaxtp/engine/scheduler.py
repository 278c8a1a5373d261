"""The scheduler: which sequences get decode slots and KV pages, which prompt chunks are
prefilled each step, when a decode chunk is queued, and what each sequence's tokens and finish
are (continuous batching with chunked prefill). It decides; engine.runner executes.

Each step fills a token budget with prefill chunks (sequences part-way through their prompt
first, then newly admitted ones), queues the next decode chunk over every slot, and only then
reads the chunk queued by the step before: the device runs chunk after chunk while the host
records tokens, frees pages and schedules. A long prompt is prefilled over several steps while
the others keep decoding. When the pool has no page for the next decode chunk, the newest
sequence is preempted: its pages are freed and it waits to be recomputed from its prompt and
the tokens it has (vLLM's preemption by recompute), so nothing runs out of memory and nothing
is lost.
"""
from __future__ import annotations

import collections

from jaxtp.engine.block_manager import BlockManager
from jaxtp.engine.kv_cache import PAGE_SIZE
from jaxtp.engine.runner import Chunk, Column, ModelRunner, Pending, bucket, round_up
from jaxtp.engine.sequence import Sequence, Status

MAX_SLOTS = 256                # concurrent sequences at most (vLLM's max_num_seqs); more queue
MAX_BATCHED_TOKENS = 8192      # prefill tokens per step (max_num_batched_tokens)
MIN_CHUNK = 16
PREFILL_ROW = 128              # prefill tokens per row: the prefill kernel's query block


class Engine:
    """Continuous batching over `max_num_seqs` decode slots and a pool of KV pages.

    The pool holds `max_kv_tokens` tokens per dp replica (default: the model's capacity from
    its memory plan, at most what every slot could use at `max_model_len`). `add` queues a
    sequence; each `step` prefills up to `max_num_batched_tokens` prompt tokens and queues one
    decode chunk of `chunk` tokens per running sequence, returning the sequences that got new
    tokens or finished. `abort` (a client went away) and `stop` (a stop string matched) end a
    sequence from the host and free its slot and pages. With data parallelism `max_num_seqs`
    must be a multiple of dp (each replica has max_num_seqs/dp slots and its own pages).
    """

    def __init__(self, model, max_num_seqs: int = MAX_SLOTS, max_model_len: int | None = None, chunk: int = 16,
                 max_num_batched_tokens: int = MAX_BATCHED_TOKENS, page_size: int = PAGE_SIZE,
                 max_kv_tokens: int | None = None, enable_prefix_caching: bool | None = None):
        dp = model.mesh.shape["dp"]
        if max_num_seqs % dp:
            raise ValueError(f"max_num_seqs={max_num_seqs} must be a multiple of data_parallel_size={dp}")
        if max_num_batched_tokens < MIN_CHUNK:
            raise ValueError(f"max_num_batched_tokens must be >= {MIN_CHUNK}, got {max_num_batched_tokens}")
        self.max_model_len = max_model_len or model.max_model_len
        slots_per_replica = max_num_seqs // dp
        tokens = min(x for x in (max_kv_tokens, model.max_kv_tokens,
                                 slots_per_replica * round_up(self.max_model_len, page_size)) if x)
        caching = model.enable_prefix_caching if enable_prefix_caching is None else enable_prefix_caching
        self.blocks = BlockManager(tokens // page_size + 1, page_size, dp, caching)  # + the scratch page
        row = min(PREFILL_ROW, 1 << max_num_batched_tokens.bit_length() - 1)
        self.runner = ModelRunner(model, max_num_seqs, self.blocks.pages, page_size, self.max_model_len, row,
                                  max_num_batched_tokens // row)
        self.slots, self.chunk, self.max_num_batched_tokens = max_num_seqs, chunk, max_num_batched_tokens
        self.eos = list(model.config.eos_token_ids)
        self.running: list[Sequence | None] = [None] * max_num_seqs
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.admitted: list[Sequence] = []   # running sequences, oldest first
        self.preemptions = 0
        self.prefix_queries = self.prefix_hits = 0  # prompt tokens looked up in the prefix cache / found
        self._freed: list[int] = []          # slots freed from the host since the last step
        self._ahead: Pending | None = None   # the decode chunk queued by the last step, unread

    def add(self, seq: Sequence) -> None:
        if seq.max_len > self.max_model_len:
            raise ValueError(f"prompt of {len(seq.prompt)} tokens + max_tokens={seq.params.max_tokens} "
                             f"exceeds the engine's maximum length of {self.max_model_len} tokens")
        pages = self.blocks.pages_for(seq.max_len)
        if pages > self.blocks.capacity:
            raise ValueError(f"prompt of {len(seq.prompt)} tokens + max_tokens={seq.params.max_tokens} needs "
                             f"{pages} KV pages of {self.blocks.page_size} tokens, but the KV cache holds "
                             f"{self.blocks.capacity} pages ({self.blocks.capacity * self.blocks.page_size} "
                             f"tokens) per replica")
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
            self._release(seq)
        seq.finish(reason, stop_reason)

    def _release(self, seq: Sequence) -> None:
        """seq's slot and pages back to the pool (work already queued runs before any reuse),
        its full pages of written keys and values known to the prefix cache."""
        self.running[seq.slot] = None
        self.admitted.remove(seq)
        written = seq.computed if seq.prefilling else len(seq.prompt) + len(seq.tokens) - 1
        self.blocks.publish(seq.pages, seq.replica, seq.ids(0, written))
        self.blocks.release(seq.pages, seq.replica)
        self.runner.set_table(seq.slot, [])

    def _preempt(self, seq: Sequence) -> None:
        self.runner.stop([seq.slot])
        self._release(seq)
        seq.requeue()
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def warmup(self, progress=None, every_variant: bool = True, threads: int | None = None) -> int:
        """Compile the engine's programs now (ModelRunner.warmup), not when requests come;
        progress(done, total, what) after each. Returns how many ran."""
        return self.runner.warmup(self.chunk, progress, every_variant, threads)

    @property
    def kv_usage(self) -> float:
        """Share of the fullest replica's KV pages that running sequences hold."""
        return self.blocks.usage()

    @property
    def num_running(self) -> int:
        return len(self.admitted)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting) or bool(self.admitted)

    def step(self) -> list[Sequence]:
        """Prefill one budget of prompt chunks, queue one decode chunk, and read the chunk
        queued by the call before (and this call's prefill); returns the sequences that got
        tokens or finished."""
        if self._freed:
            self.runner.stop(self._freed)
            self._freed = []
        prefill = self._prefill()
        ready, self._ahead = self._ahead, self._launch(prefill)
        return self._collect([p for p in (ready, prefill) if p is not None])

    def _prefill(self) -> Pending | None:
        """Chunks of the running prompts (oldest first), then of newly admitted ones, in one call
        within the token budget (real tokens: the projections run packed) and the call's rows."""
        decoding = sum(not s.prefilling for s in self.admitted)
        chunks: list[Chunk] = []
        for seq in [s for s in self.admitted if s.prefilling]:
            room = self._room(chunks)
            if room < MIN_CHUNK:
                break
            if seq.status is not Status.RUNNING:  # preempted for an older one's pages
                continue
            length = self._chunk_length(seq.target - seq.computed, room)
            if length and not self._add_chunk(chunks, seq, length):
                break
        while self.waiting and (room := self._room(chunks)) >= MIN_CHUNK and self._admit(self.waiting[0], chunks,
                                                                                          room, decoding):
            self.waiting.popleft()
        return self.runner.prefill(chunks) if chunks else None

    def _room(self, chunks: list[Chunk]) -> int:
        """Tokens a prefill call holding `chunks` can still take: what is left of its token budget
        and of its rows (each chunk fills whole rows). Decode is its own call."""
        row = self.runner.prefill_row
        tokens = self.runner.prefill_rows * row - sum(c.length for c in chunks)
        rows = self.runner.max_prefill_rows - sum(-(-c.length // row) for c in chunks)
        return min(tokens, rows * row)

    def _chunk_length(self, rest: int, room: int) -> int:
        """Tokens of a chunk within `room`: all `rest` of a prompt, or a cut at a page boundary,
        so that every chunk starts on one where prefill rows write whole pages."""
        if rest <= room or not self.runner.whole_pages:
            return min(rest, room)
        return room // self.blocks.page_size * self.blocks.page_size

    def _add_chunk(self, chunks: list[Chunk], seq: Sequence, length: int) -> bool:
        """seq's next chunk of `length` tokens into the call, with its pages (preempting newer
        sequences if the pool is short); False if seq itself had to be preempted. Its full pages
        are known to the prefix cache at once: a later row of the same call may read them."""
        if not self._reserve(seq, seq.computed + length):
            return False
        chunks.append(Chunk(seq, seq.computed, length))
        seq.computed += length
        self.blocks.publish(seq.pages, seq.replica, seq.ids(0, seq.computed))
        return True

    def _admit(self, seq: Sequence, chunks: list[Chunk], length: int, decoding: int) -> bool:
        """Give `seq` a free slot, the cached pages of its longest known prefix and its first
        chunk, if a slot and pages allow (keeping a page per decoding sequence for its growth)."""
        per, target = self.slots // self.blocks.replicas, len(seq.prompt) + len(seq.tokens)
        replicas = sorted({i // per for i, s in enumerate(self.running) if s is None})
        if not replicas:
            return False
        # Prompt log-probs need the whole prompt computed, and the penalties' statistics are made
        # from the prefilled tokens: such requests take nothing from the prefix cache.
        cacheable = seq.params.prompt_logprobs is None and not seq.params.penalized
        known = {r: self.blocks.known_prefix(r, seq.ids(0, target)) if cacheable else [] for r in replicas}
        # the replica that knows the longest prefix, then the one with the most free pages
        replica = max(replicas, key=lambda r: (len(known[r]), self.blocks.free_pages(r)))
        slot = self.running.index(None, replica * per)
        pages = self.blocks.take(replica, known[replica])
        cached = len(pages) * self.blocks.page_size
        length = self._chunk_length(target - cached, length)
        if not length or self.blocks.free_pages(replica) - self.blocks.needed(pages, cached + length) < \
                decoding // self.blocks.replicas:
            self.blocks.release(pages, replica)
            return False
        seq.run_in(slot, replica, pages, cached)
        self.prefix_queries += target
        self.prefix_hits += cached
        self.running[seq.slot] = seq
        self.admitted.append(seq)
        return self._add_chunk(chunks, seq, length)  # the pages were checked: nothing is preempted

    def _launch(self, prefill: Pending | None) -> Pending | None:
        """Queue a decode chunk over the decoding sequences that need more tokens than the work
        already queued gives them, with pages for it."""
        queued = collections.Counter()  # tokens per sequence in work the host has not read yet
        for p in (self._ahead, prefill):
            for col, seq in enumerate(p.seqs if p is not None else ()):
                if p.chunks is None or (p.chunks[col] is not None and p.chunks[col].last):
                    queued[id(seq)] += p.step.tokens.shape[0]
        # A sequence the queued work gives all its max_tokens takes no row: it would only run done.
        active = [s for s in self.admitted if not s.prefilling and len(s.tokens) + queued[id(s)] < s.params.max_tokens]
        for seq in active:
            if seq.status is Status.RUNNING:
                need = min(seq.max_len, len(seq.prompt) + len(seq.tokens) + queued[id(seq)] + self.chunk)
                self._reserve(seq, need)
        decoding = {id(s) for s in active if s.status is Status.RUNNING}
        columns = [s if s is not None and id(s) in decoding else None for s in self.running]
        return self.runner.decode(columns, self.chunk) if any(columns) else None

    def _reserve(self, seq: Sequence, tokens: int) -> bool:
        """Pages for `tokens` positions of seq, preempting the newest sequences of its replica
        (seq itself last) until they fit; False if seq was preempted."""
        while not self.blocks.grow(seq.pages, seq.replica, tokens):
            self._preempt(next(s for s in reversed(self.admitted) if s.replica == seq.replica))
            if seq.status is not Status.RUNNING:
                return False
        self.runner.set_table(seq.slot, seq.pages)
        return True

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
            seq.prompt_logprobs = (seq.prompt_logprobs or []) + col.prompt_logprobs
        seq.tokens += col.tokens
        seq.logprobs += col.logprobs
        if col.done and not seq.finished:  # the device ended it: a stop token or max_tokens
            last = seq.tokens[-1]
            stopped = last in seq.stop_ids and len(seq.tokens) >= seq.params.min_tokens
            self._release(seq)
            seq.finish("stop" if stopped else "length", last if stopped and last not in self.eos else None)


def run(model, seqs: list[Sequence], chunk: int = 16, max_slots: int = MAX_SLOTS):
    """Generate `seqs` to completion; yields (engine, sequences that changed) after every engine
    step, so callers can stream. The engine gets a slot per sequence (up to max_slots, vLLM's
    max_num_seqs) and a pool sized to what they need, within the model's KV capacity; when the
    pool runs short, sequences wait or are preempted and recomputed."""
    dp = model.mesh.shape["dp"]
    max_len = max(s.max_len for s in seqs)
    slots = round_up(min(bucket(len(seqs)), max_slots), dp)
    need = sum(round_up(s.max_len, PAGE_SIZE) for s in seqs[:slots])
    engine = Engine(model, slots, max_len, chunk, max_kv_tokens=max(round_up(max_len, PAGE_SIZE), need))
    for s in seqs:
        engine.add(s)
    while engine.has_unfinished:
        yield engine, engine.step()
