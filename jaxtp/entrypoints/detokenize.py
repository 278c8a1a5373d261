"""Incremental detokenization with stop strings, one sequence at a time (vLLM semantics).

Text is released only once it is final: never half a UTF-8 character (a byte-level token can
end mid-character) and never the start of what may still become a stop string. A stop string
ends the text where it begins (or ends, with include_stop_str_in_output), even mid-token; the
token ids keep every token up to the one that completed it.

Decoding starts from the last few prompt tokens (`context`), and only the text after them is
emitted: SentencePiece-style tokenizers drop a word's leading space when it opens the decoded
text, so "playing" + "▁in" must decode as " in", not "in".
"""
from __future__ import annotations


CONTEXT_TOKENS = 5  # prompt tokens decoded ahead of the output (vLLM's choice)


class TextStream:
    def __init__(self, tokenizer, stop: list[str] = (), include_stop: bool = False,
                 skip_special_tokens: bool = True, context: list[int] = ()):
        self.tokenizer, self.stop, self.include_stop = tokenizer, list(stop), include_stop
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []  # the generated tokens
        self._all = list(context)[-CONTEXT_TOKENS:] if context else []  # context + ids: what is decoded
        self.text = ""           # decoded so far (may run ahead of what was released)
        self.released = 0        # len of text handed out
        self.stop_str: str | None = None
        self._prefix, self._read = 0, len(self._all)  # decode _all[prefix:] against _all[prefix:read]

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token: int) -> bool:
        """Append one token; returns True if it completed a stop string (then stop feeding)."""
        self.ids.append(token)
        self._all.append(token)
        if self.tokenizer is None:
            return False
        before = self._decode(self._all[self._prefix:self._read])
        after = self._decode(self._all[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self._all)
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                i, self.stop_str = min(hits)
                self.text = self.text[: i + len(self.stop_str) if self.include_stop else i]
                return True
        return False

    def release(self, final: bool) -> str:
        """The text that became final since the last call (all of it once the sequence ended)."""
        if final and self.stop_str is None and self.tokenizer is not None and self._read < len(self._all):
            before = self._decode(self._all[self._prefix:self._read])   # a trailing partial character
            self.text += self._decode(self._all[self._prefix:])[len(before):]
            self._read = len(self._all)
        end = len(self.text)
        if not final and self.stop_str is None:
            end -= max((n for s in self.stop for n in range(len(s) - 1, 0, -1)
                        if self.text.endswith(s[:n])), default=0)
        delta, self.released = self.text[self.released:end], max(self.released, end)
        return delta
