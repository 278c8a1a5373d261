"""The host state of one sequence: its prompt, what it has generated, and where it is in its
lifecycle (waiting -> running -> finished; a running one holds a cache slot)."""
from __future__ import annotations

import dataclasses
import enum

from jaxtp.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"    # queued for a slot
    RUNNING = "running"    # holds a cache slot, decoding
    FINISHED = "finished"  # finish_reason says why


@dataclasses.dataclass(eq=False)
class Sequence:
    """One sequence to generate (a request with n samples has n). The engine appends to `tokens`
    (and `logprobs`) and finishes it with a reason ("stop" | "length" | "abort")."""
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

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def run_in(self, slot: int) -> None:
        self.status, self.slot = Status.RUNNING, slot

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status, self.finish_reason, self.stop_reason, self.slot = Status.FINISHED, reason, stop_reason, None
