"""Sampling parameters (vLLM-shaped) and the on-device sampler.

Randomness is per request: row b draws with key fold_in(key(seed_b), tokens generated so far),
so a seeded request yields the same tokens whatever else is in the batch and whatever the tp.
Seeds are any 64-bit integers (as vLLM's): the high half is folded into the key when nonzero.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class SamplingParams:
    """What to generate for one prompt; fields, defaults and meanings follow vLLM's SamplingParams.

    Penalties (vLLM/OpenAI semantics): repetition_penalty divides positive logits and multiplies
    negative ones for tokens seen in the prompt or the output; presence_penalty and
    frequency_penalty subtract from the logits of tokens already generated (once, and per
    occurrence). logprobs: how many top log-probabilities to return per generated token (0: only
    the sampled token's); prompt_logprobs: the same for each prompt token. Log-probabilities are
    of the raw model distribution, before penalties and temperature (vLLM's default).
    """
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0          # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self):
        def check(ok, field, allowed):
            if not ok:
                raise ValueError(f"SamplingParams.{field} must be {allowed}, got "
                                 f"{getattr(self, field)!r}")
        check(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"an integer in [1, {MAX_N}]")
        check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1")
        check(_is_num(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0")
        check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]")
        check(_is_int(self.top_k) and self.top_k >= -1, "top_k", "-1, 0 (off) or a positive integer")
        check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]")
        check(self.seed is None or (_is_int(self.seed) and -2 ** 63 <= self.seed < 2 ** 64), "seed",
              "None or a 64-bit integer (in [-2**63, 2**64))")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        check(self.stop is None or (isinstance(self.stop, (list, tuple)) and
                                    all(isinstance(s, str) and s for s in self.stop)),
              "stop", "a non-empty string or a list of non-empty strings")
        self.stop = list(self.stop or [])
        check(isinstance(self.stop_token_ids, (list, tuple)) and
              all(_is_int(t) and 0 <= t <= MAX_ID for t in self.stop_token_ids), "stop_token_ids",
              f"a list of token ids in [0, {MAX_ID}]")
        check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
              "an integer in [0, max_tokens]")
        check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0,
              "repetition_penalty", "a number > 0 (1: off)")
        check(_is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
              "presence_penalty", "in [-2, 2]")
        check(_is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
              "frequency_penalty", "in [-2, 2]")
        for field in ("logprobs", "prompt_logprobs"):
            v = getattr(self, field)
            check(v is None or (_is_int(v) and 0 <= v <= MAX_LOGPROBS), field,
                  f"None or an integer in [0, {MAX_LOGPROBS}]")
        for field in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            check(isinstance(getattr(self, field), (bool, np.bool_)), field, "True or False")
        self.stop_token_ids = list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty, self.presence_penalty, self.frequency_penalty) != (1, 0, 0)

    @property
    def plain(self) -> bool:
        """Greedy, asking for nothing else a step computes (log-probs, penalties, min_tokens):
        such rows need only the argmax."""
        return self.greedy and self.logprobs is None and not self.penalized and self.min_tokens == 0


MAX_LOGPROBS = 20  # as OpenAI's API; bounds the top-k the engine computes
MAX_N = 128        # samples per prompt, OpenAI's bound
MAX_ID = 2 ** 31 - 1  # token ids travel as int32


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) \
        and math.isfinite(x)


class SamplerArrays(NamedTuple):
    """Per-row sampling parameters as arrays [B] (stop_ids [B, K], -1 padded)."""
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    seed: jax.Array         # uint32: the low half of the 64-bit seed
    seed_high: jax.Array    # uint32: the high half
    index: jax.Array        # which of a request's n samples: a second key stream per seed
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    min_tokens: jax.Array
    stop_ids: jax.Array     # token ids that end the row (EOS unless ignore_eos, stop_token_ids)

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int],
              stops: list[list[int]] | None = None, indices: list[int] | None = None) -> "SamplerArrays":
        stops = stops or [[]] * len(params)
        width = max(4, 1 << (max(map(len, stops)) - 1).bit_length())  # few distinct shapes
        stop_ids = np.full((len(params), width), -1, np.int32)
        for i, x in enumerate(stops):
            stop_ids[i, : len(x)] = x
        f32 = lambda field: np.array([getattr(p, field) for p in params], np.float32)  # noqa: E731
        seeds = [s % 2 ** 64 for s in seeds]
        return cls(f32("temperature"), np.array([min(max(p.top_k, 0), MAX_ID) for p in params], np.int32),
                   f32("top_p"), f32("min_p"), np.array([s & 0xFFFFFFFF for s in seeds], np.uint32),
                   np.array([s >> 32 for s in seeds], np.uint32),
                   np.array(indices or [0] * len(params), np.uint32), f32("repetition_penalty"),
                   f32("presence_penalty"), f32("frequency_penalty"),
                   np.array([p.min_tokens for p in params], np.int32), stop_ids)


class Penalties(NamedTuple):
    """Per-row token statistics the penalties need, [B, V_padded]; only kept when a row asks."""
    in_prompt: jax.Array    # bool: token occurs in the prompt
    counts: jax.Array       # int32: times the token was generated


def apply_penalties(logits: jax.Array, s: SamplerArrays, p: Penalties) -> jax.Array:
    """vLLM's order and formulas: repetition (prompt + output), then frequency and presence."""
    rep = s.repetition_penalty[:, None]
    seen = p.in_prompt | (p.counts > 0)
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return (logits - s.frequency_penalty[:, None] * p.counts
            - s.presence_penalty[:, None] * (p.counts > 0))


def ban_stops(logits: jax.Array, s: SamplerArrays, count: jax.Array) -> jax.Array:
    """min_tokens: a row that has generated fewer than min_tokens cannot sample a stop token.
    Written into the stop ids' entries only (padding and allowed rows: dropped), so running it
    for every row costs [B, stops], and no step needs a variant without it."""
    rows = jnp.arange(logits.shape[0])[:, None]
    ban = (count < s.min_tokens)[:, None] & (s.stop_ids >= 0)
    return logits.at[rows, jnp.where(ban, s.stop_ids, logits.shape[-1])].set(-jnp.inf, mode="drop")


def filter_logits(logits: jax.Array, s: SamplerArrays, vocab_size: int) -> jax.Array:
    """Temperature-scaled logits [B, V] with everything outside top-k / top-p / min-p set to -inf.

    Order as in vLLM and transformers: temperature, top-k, top-p (on the top-k renormalized
    distribution), min-p.
    """
    x = logits / jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    ranked = -jnp.sort(-x, axis=-1)                                     # descending
    v = x.shape[-1]
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, vocab_size), v)
    kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)
    ranked = jnp.where(jnp.arange(v)[None, :] < k[:, None], ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.maximum(jnp.sum(mass_before < s.top_p[:, None], axis=-1), 1)
    pth = jnp.take_along_axis(ranked, (n_keep - 1)[:, None], axis=-1)
    pth = jnp.where(s.top_p[:, None] < 1, pth, -jnp.inf)  # rounding must not cut top_p=1's tail
    minp = ranked[:, :1] + jnp.log(s.min_p)[:, None]                    # log 0 = -inf: off
    return jnp.where(x >= jnp.maximum(jnp.maximum(kth, pth), minp), x, -jnp.inf)


def sample(logits: jax.Array, s: SamplerArrays, count: jax.Array, vocab_size: int,
           plain: bool, penalties: Penalties | None = None) -> jax.Array:
    """Next token [B] from float32 logits [B, V_padded] for rows that have generated `count`
    tokens: greedy rows (temperature 0) take the argmax, the others a Gumbel-max draw from the
    filtered distribution, after min_tokens and the penalties (a row without them is unchanged).
    The static flag plain (every row SamplingParams.plain) leaves only the argmax."""
    logits = jnp.asarray(logits)
    if plain:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = ban_stops(logits, s, count)
    if penalties is not None:
        logits = apply_penalties(logits, s, penalties)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = filter_logits(logits, s, vocab_size)

    def gumbel(seed, high, index, count):  # drawn over the true vocab so the stream is independent of tp
        key = jax.random.key(seed)
        key = jax.random.wrap_key_data(jnp.where(high == 0, jax.random.key_data(key),
                                                 jax.random.key_data(jax.random.fold_in(key, high))))
        key = jax.random.fold_in(jax.random.fold_in(key, index), count)
        return jax.random.gumbel(key, (vocab_size,), jnp.float32)

    noise = jax.vmap(gumbel)(s.seed, s.seed_high, s.index, count)
    noise = jnp.pad(noise, ((0, 0), (0, x.shape[-1] - vocab_size)))
    drawn = jnp.argmax(x + noise, axis=-1).astype(jnp.int32)
    return jnp.where(s.temperature > 0, drawn, best)


class TokenLogprobs(NamedTuple):
    """Log-probabilities of chosen tokens [...] and the top-k alternatives [..., k]."""
    logprob: jax.Array
    rank: jax.Array         # 1 + number of tokens more likely than the chosen one
    top_ids: jax.Array
    top_logprobs: jax.Array


def token_logprobs(logits: jax.Array, chosen: jax.Array, k: int) -> TokenLogprobs:
    """Raw-distribution log-probabilities for logits [..., V] and chosen ids [...], with the
    top k."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    log_sum = jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True))  # as log_softmax rounds
    picked = jnp.take_along_axis(logits, chosen[..., None], axis=-1)
    rank = jnp.sum(logits > picked, axis=-1).astype(jnp.int32) + 1
    best, best_ids = top_k(logits, k)
    return TokenLogprobs(((picked - top) - log_sum)[..., 0], rank, best_ids, (best - top) - log_sum)


def top_k(x: jax.Array, k: int, block: int = 128) -> tuple[jax.Array, jax.Array]:
    """jax.lax.top_k over the last axis (values, int32 ids), exact, without sorting the whole
    vocabulary (XLA sorts for a k this large): the k largest lie in the k blocks of `block`
    entries with the largest maxima, so only those k * block candidates are ranked."""
    *lead, v = x.shape
    if k == 0:
        return x[..., :0], jnp.zeros((*lead, 0), jnp.int32)
    if v <= 4 * k * block:
        top, ids = jax.lax.top_k(x, k)
        return top, ids.astype(jnp.int32)
    pad = -v % block
    blocks = jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad)], constant_values=-jnp.inf)
    blocks = blocks.reshape(*lead, (v + pad) // block, block)
    _, best = jax.lax.top_k(blocks.max(axis=-1), k)                                 # [..., k]
    candidates = jnp.take_along_axis(blocks, best[..., None], axis=-2).reshape(*lead, k * block)
    top, at = jax.lax.top_k(candidates, k)
    ids = best[..., None] * block + jnp.arange(block)
    return top, jnp.take_along_axis(ids.reshape(*lead, k * block), at, axis=-1).astype(jnp.int32)
