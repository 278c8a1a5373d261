"""A Pallas (Triton) matrix-vector product for decode: y[B, N] = x[B, K] @ w[K, N], B small.

At decode a projection reads its whole weight to multiply one row (or a few) by it, so its speed
is the rate at which the weight streams from HBM. XLA's GEMM emitters tile such products for
matrices (cuBLAS reached 3.2 TB/s on gate_up, Triton 2.4 TB/s on qkv of an H200's ~4.3); at
tp=2 it even rewrites o_proj as a multiply plus a reduction at 0.8 TB/s. This kernel is written
for the case: each program streams a [K/splits, bn] column panel in [bk, bn] tiles, multiplying
by x in fp32 registers (or with tensor cores for larger B), and the `splits` partial sums over K
are added by XLA in the consumer's fusion. Splitting K gives every SM several programs, which is
what keeps enough loads in flight to saturate HBM.

Runs on GPUs through Triton and anywhere in Pallas interpret mode (the CPU tests).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

MAX_ROWS = 32       # above this XLA's GEMMs are the better choice (compute, not bandwidth)
TARGET_PROGRAMS = 512  # ~4 per SM on an H100/H200


@dataclasses.dataclass(frozen=True)
class Config:
    bn: int = 128       # output columns per program (256 contiguous bytes of a bf16 row), at most
    bk: int = 32        # rows of w per loop step, at most
    splits: int = 0     # programs along K; 0 = enough for TARGET_PROGRAMS
    warps: int = 4
    stages: int = 3
    dot: bool | None = None  # tensor cores; None = for more than 4 rows


def _tile(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n (Triton tiles are powers of two)."""
    return math.gcd(n, cap) if cap & (cap - 1) == 0 else 1


def supported(rows: int, k: int, n: int, config: Config = Config()) -> bool:
    return rows <= MAX_ROWS and _tile(n, config.bn) >= 16 and _tile(k, config.bk) >= 16


def _splits(k: int, n: int, bn: int, bk: int, c: Config) -> int:
    if c.splits:
        return c.splits
    chunks, splits = k // bk, 1
    while (n // bn) * splits < TARGET_PROGRAMS and chunks % (splits * 2) == 0:
        splits *= 2
    return splits


def gemv(x: jax.Array, w: jax.Array, config: Config = Config(), interpret: bool | None = None) -> jax.Array:
    """x [B, K] @ w [K, N] -> float32 [B, N]; B <= MAX_ROWS, N % bn == 0, K % bk == 0."""
    (b, k), n = x.shape, w.shape[1]
    if not supported(b, k, n, config):
        raise ValueError(f"gemv: unsupported shape x {x.shape} @ w {w.shape} for {config}")
    c = dataclasses.replace(config, bn=_tile(n, config.bn), bk=_tile(k, config.bk))
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    dot = b > 4 if c.dot is None else c.dot
    rows = max(16 if dot else 1, pl.next_power_of_2(b))  # Triton blocks are powers of two
    if rows != b:
        x = jnp.pad(x, ((0, rows - b), (0, 0)))
    splits = _splits(k, n, c.bn, c.bk, c)
    if k % (c.bk * splits):
        raise ValueError(f"gemv: K={k} does not split into {splits} parts of whole {c.bk}-row tiles")
    steps = k // (c.bk * splits)

    def kernel(x_ref, w_ref, o_ref):
        col, split = pl.program_id(0), pl.program_id(1)
        cols = pl.ds(pl.multiple_of(col * c.bn, c.bn), c.bn)
        first = split * steps * c.bk

        def body(i, acc):
            ks = pl.ds(pl.multiple_of(first + i * c.bk, c.bk), c.bk)
            wt, xt = w_ref[ks, cols], x_ref[:, ks]
            if dot:
                return acc + plt.dot(xt, wt.astype(xt.dtype))
            return acc + xt.astype(jnp.float32)[:, :, None] * wt.astype(jnp.float32)[None]

        # Without tensor cores the [rows, bk, bn] products are summed over bk once, at the end.
        acc = jnp.zeros((rows, c.bn) if dot else (rows, c.bk, c.bn), jnp.float32)
        acc = jax.lax.fori_loop(0, steps, body, acc)
        o_ref[split, :, cols] = acc if dot else acc.sum(axis=1)

    partial = pl.pallas_call(
        kernel, grid=(n // c.bn, splits), interpret=interpret,
        out_shape=jax.ShapeDtypeStruct((splits, rows, n), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=c.warps, num_stages=c.stages),
    )(x, w)
    return partial.sum(axis=0)[:b]
