"""Prompts to token ids, one way for every entry point: text is tokenized, token-id lists are
checked against the vocabulary, and conversations go through the tokenizer's chat template.
Every bad prompt is a ValueError that says what is wrong with it."""
from __future__ import annotations

import numpy as np


def check_ids(model, ids) -> list[int]:
    """A token-id prompt as a list of ints, each within the model's vocabulary."""
    vocab = model.config.vocab_size
    for t in ids:
        if not isinstance(t, (int, np.integer)) or not 0 <= t < vocab:
            raise ValueError(f"token id {t!r} is out of range for a vocabulary of {vocab}")
    return list(map(int, ids))


def check_text(text: str, what: str = "prompt") -> str:
    """`text` if it can be encoded as UTF-8 (JSON lets a lone surrogate such as \\ud800 through)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode: a lone surrogate {text[e.start]!r} at "
                         f"position {e.start}") from None
    return text


def encode(model, prompt) -> list[int]:
    """One prompt (a string or a token-id list) -> its token ids, never empty."""
    if isinstance(prompt, str):
        check_text(prompt)
        if model.tokenizer is None:
            raise ValueError(f"{model.path} has no tokenizer: pass token-id prompts instead of text")
        ids = list(model.tokenizer(prompt)["input_ids"])
    else:
        ids = check_ids(model, prompt)
    if not ids:
        raise ValueError("a prompt is empty: it needs at least one token")
    return ids


def check_params(model, params) -> None:
    """What SamplingParams cannot check alone: its token ids against the model's vocabulary."""
    vocab = model.config.vocab_size
    for t in params.stop_token_ids:
        if t >= vocab:
            raise ValueError(f"stop_token_ids: token id {t} is out of range for a vocabulary of {vocab}")


def chat_prompt(model, messages: list[dict], add_generation_prompt: bool = True,
                chat_template: str | None = None) -> list[int]:
    """Token ids of a conversation rendered with the tokenizer's chat template."""
    if model.tokenizer is None:
        raise ValueError(f"{model.path} has no tokenizer, so it has no chat template")
    if not isinstance(messages, (list, tuple)) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if isinstance(m["content"], str):
            check_text(m["content"], f"messages[{i}].content")
    try:
        ids = model.tokenizer.apply_chat_template(list(messages), chat_template=chat_template,
                                                  add_generation_prompt=add_generation_prompt,
                                                  tokenize=True)
    except ValueError as e:  # transformers: "Cannot use chat template functions because ..."
        raise ValueError(f"cannot apply a chat template for {model.path}: {e}") from None
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
