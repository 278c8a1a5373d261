"""Rotary position embeddings: frequencies as transformers computes them, applied on device.

Frequencies are computed once in numpy (float32, same formulas as
`transformers.modeling_rope_utils`) and baked into the jitted step as constants.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def inv_freq(head_dim: int, theta: float, scaling: dict, max_position_embeddings: int
             ) -> tuple[np.ndarray, float]:
    """Return (inverse frequencies [head_dim // 2] float32, attention scaling of cos/sin)."""
    kind = scaling.get("rope_type", "default")
    base = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim)
    base = base.astype(np.float32)
    if kind == "default":
        return base, 1.0
    if kind == "linear":
        return (base / np.float32(scaling["factor"])).astype(np.float32), 1.0
    if kind == "llama3":
        return _llama3(base, scaling), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling, max_position_embeddings)
    raise ValueError(f"rope_type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _llama3(freq: np.ndarray, s: dict) -> np.ndarray:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freq
    scaled = np.where(wavelen > old_len / low, freq / factor, freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(dim: int, theta: float, s: dict, max_pos: int) -> tuple[np.ndarray, float]:
    old_len = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_pos / old_len

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)

    def correction_dim(rotations):
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    hi = hi + 0.001 if lo == hi else hi
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32) / dim)
    freq = (1 / (factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation
    return freq.astype(np.float32), float(attention)


def cos_sin(positions: jnp.ndarray, freq: np.ndarray, scale: float):
    """cos/sin tables [B, T, head_dim] in float32 for integer positions [B, T]."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [B, T, heads, head_dim] (rotate-half convention, as Llama in transformers)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
