"""Sampling parameters (vLLM-shaped) and the on-device sampler.

Randomness is per request: row b draws with key fold_in(key(seed_b), tokens generated so far),
so a seeded request yields the same tokens whatever else is in the batch and whatever the tp.
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
    """What to generate for one prompt. Defaults follow vLLM (temperature 1.0, 16 tokens)."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0          # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0

    def __post_init__(self):
        def check(ok, field, allowed):
            if not ok:
                raise ValueError(f"SamplingParams.{field} must be {allowed}, got "
                                 f"{getattr(self, field)!r}")
        check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1")
        check(_is_num(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0")
        check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]")
        check(_is_int(self.top_k) and self.top_k >= -1, "top_k", "-1, 0 (off) or a positive integer")
        check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]")
        check(self.seed is None or _is_int(self.seed), "seed", "None or an integer")
        check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
              "a list of non-negative token ids")
        check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
              "an integer in [0, max_tokens]")
        self.stop_token_ids = list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) \
        and math.isfinite(x)


class SamplerArrays(NamedTuple):
    """Per-row sampling parameters as device arrays [B]."""
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    seed: jax.Array

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int]) -> "SamplerArrays":
        return cls(np.array([p.temperature for p in params], np.float32),
                   np.array([max(p.top_k, 0) for p in params], np.int32),
                   np.array([p.top_p for p in params], np.float32),
                   np.array([p.min_p for p in params], np.float32),
                   np.array(seeds, np.uint32))


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


def sample(logits: jax.Array, s: SamplerArrays, counter: jax.Array, vocab_size: int,
           greedy: bool) -> jax.Array:
    """Next token [B] from float32 logits [B, V_padded]: greedy rows (temperature 0) take the
    argmax, the others a Gumbel-max draw from the filtered distribution."""
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return best
    x = filter_logits(logits, s, vocab_size)

    def gumbel(seed, count):  # drawn over the true vocab so the stream is independent of tp
        key = jax.random.fold_in(jax.random.key(seed), count)
        return jax.random.gumbel(key, (vocab_size,), jnp.float32)

    noise = jnp.pad(jax.vmap(gumbel)(s.seed, counter), ((0, 0), (0, x.shape[-1] - vocab_size)))
    drawn = jnp.argmax(x + noise, axis=-1).astype(jnp.int32)
    return jnp.where(s.temperature > 0, drawn, best)
