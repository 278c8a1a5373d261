"""What generation returns (vLLM's RequestOutput / CompletionOutput / Logprob, and jaxtp's flat
`Completion`), and `Request`: the host-side bookkeeping that turns the engine's token sequences
into text, log-probabilities and stream deltas. It only reads the sequences: when a stop string
matches, the delta says so and the caller ends the sequence through the engine."""
from __future__ import annotations

import dataclasses
import random

from jaxtp.engine import Sequence
from jaxtp.engine.sampling import SamplingParams
from jaxtp.entrypoints.detokenize import TextStream


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None            # "stop" | "length" | "abort"; None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool = True


@dataclasses.dataclass
class Completion:
    """`jaxtp.generate`'s simple form: one per prompt (n per prompt, in order, when n > 1)."""
    prompt: str | list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_token_ids: list[int] = dataclasses.field(default_factory=list)
    index: int = 0
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    stop_reason: int | str | None = None


@dataclasses.dataclass
class Delta:
    """A streamed piece of one sample: new text and token ids since the last delta. stop_str:
    the stop string that ended the sample here, at its first num_tokens tokens (the engine
    still has to be told: Engine.stop)."""
    request: "Request"
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, Logprob]] | None = None  # for token_ids, if the request asked
    stop_str: str | None = None
    num_tokens: int = 0


class Request:
    """One prompt with its `params.n` engine sequences and their text streams."""

    def __init__(self, request_id: str, prompt, prompt_ids: list[int], params: SamplingParams, tokenizer):
        self.request_id, self.prompt, self.prompt_ids, self.params = request_id, prompt, prompt_ids, params
        self.tokenizer = tokenizer
        seed = params.seed if params.seed is not None else random.getrandbits(31)  # unseeded: fresh
        self.seqs = [Sequence(prompt_ids, params, seed, i) for i in range(params.n)]
        self.texts = [TextStream(tokenizer, params.stop, params.include_stop_str_in_output,
                                 params.skip_special_tokens, prompt_ids) for _ in self.seqs]

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def update(self, seq: Sequence) -> Delta:
        """Feed `seq`'s new tokens through its text stream; the delta since the last one."""
        stream = self.texts[seq.index]
        seen = len(stream.ids)
        stop_str = None
        for tok in seq.tokens[seen:]:
            if stream.add(tok):
                stop_str = stream.stop_str
                break
        new = stream.ids[seen:]
        logprobs = None
        if self.params.logprobs is not None:
            logprobs = self._logprobs(zip(new, seq.logprobs[seen:seen + len(new)]))
        finish = "stop" if stop_str is not None else seq.finish_reason
        return Delta(self, seq.index, stream.release(finish is not None), new, finish, logprobs,
                     stop_str, len(stream.ids))

    def _logprobs(self, entries) -> list[dict[int, Logprob]]:
        decode = (lambda t: self.tokenizer.decode([t])) if self.tokenizer else (lambda t: None)
        out = []
        for tok, (lp, rank, top_ids, top_lps) in entries:
            d = {tok: Logprob(lp, rank, decode(tok))}
            for r, (t, x) in enumerate(zip(top_ids, top_lps)):
                d.setdefault(t, Logprob(x, r + 1, decode(t)))
            out.append(d)
        return out

    def _sample(self, seq: Sequence) -> CompletionOutput:
        logprobs = cumulative = None
        if self.params.logprobs is not None:
            logprobs = self._logprobs(zip(seq.tokens, seq.logprobs))
            cumulative = sum(e[0] for e in seq.logprobs)
        return CompletionOutput(seq.index, self.texts[seq.index].text, list(seq.tokens), cumulative,
                                logprobs, seq.finish_reason, seq.stop_reason)

    def prompt_logprobs(self):
        seq = self.seqs[0]
        if seq.prompt_logprobs is None:
            return None
        return [None] + self._logprobs(zip(self.prompt_ids[1:], seq.prompt_logprobs))

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt if isinstance(self.prompt, str) else None,
                             self.prompt_ids, self.prompt_logprobs(),
                             [self._sample(s) for s in self.seqs], self.finished)

    def completions(self) -> list[Completion]:
        out = self.output()
        return [Completion(self.prompt, o.text, o.token_ids, o.finish_reason, self.prompt_ids, o.index,
                           o.cumulative_logprob, o.logprobs, out.prompt_logprobs, o.stop_reason)
                for o in out.outputs]
