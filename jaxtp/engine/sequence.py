"""The host state of one sequence: its prompt, what it has generated, and where it is in its
lifecycle (waiting -> running -> finished; a running one holds a decode slot and KV pages, and
a preempted one goes back to waiting and is recomputed)."""
from __future__ import annotations

import dataclasses
import enum

from jaxtp.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"    # queued for a slot and pages
    RUNNING = "running"    # holds a slot and pages: prefilling, then decoding
    FINISHED = "finished"  # finish_reason says why


@dataclasses.dataclass(eq=False)
class Sequence:
    """One sequence to generate (a request with n samples has n). The engine appends to `tokens`
    (and `logprobs`) and finishes it with a reason ("stop" | "length" | "abort").

    While running: `pages` are its KV pages (in `replica`'s pool), `computed` counts the
    positions whose keys and values they hold, `cached` those found in the prefix cache at
    admission, and `target` the positions to prefill (the prompt, plus the tokens generated
    before a preemption). `runs` counts admissions, so work
    queued before a preemption is recognised and dropped."""
    prompt: list[int]
    params: SamplingParams
    seed: int
    index: int = 0
    stop_ids: list[int] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[tuple] = dataclasses.field(default_factory=list)  # (logprob, rank, top_ids, top_lps)
    prompt_logprobs: list[tuple] | None = None
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    slot: int | None = None
    replica: int = 0
    pages: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0
    target: int = 0
    cached: int = 0
    runs: int = 0

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def prefilling(self) -> bool:
        return self.status is Status.RUNNING and self.computed < self.target

    @property
    def max_len(self) -> int:
        """Positions it can ever hold: the prompt and every token it may generate."""
        return len(self.prompt) + self.params.max_tokens

    def ids(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) of prompt + generated tokens."""
        return (self.prompt + self.tokens)[start:end]

    def run_in(self, slot: int, replica: int, pages: list[int] | None = None, cached: int = 0) -> None:
        """Running in `slot` of `replica`, holding `pages` whose first `cached` positions are a
        known prefix (from the prefix cache) to begin with."""
        self.status, self.slot, self.replica, self.runs = Status.RUNNING, slot, replica, self.runs + 1
        self.pages, self.computed, self.cached = [] if pages is None else pages, cached, cached
        self.target = len(self.prompt) + len(self.tokens)

    def requeue(self) -> None:
        """Preempted: back to waiting, to be recomputed from its prompt and tokens."""
        self.status, self.slot, self.computed = Status.WAITING, None, 0

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status, self.finish_reason, self.stop_reason, self.slot = Status.FINISHED, reason, stop_reason, None
