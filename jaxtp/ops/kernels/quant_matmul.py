"""A Pallas (Triton) product of a few activation rows with an 8-bit weight (int8 or fp8 e4m3)
and its per-output-channel scale, for the decode steps' projections, which should stream the
8-bit bytes at the HBM bandwidth.

XLA multiplies a decode batch by an 8-bit weight as a convert fused into its GEMM, which reads
the 8-bit bytes at about half the HBM bandwidth. Here each program streams a [block_k, block_n] tile
of the 8-bit weight at a time, converts it in registers and feeds the tensor cores, with the
rows padded to 16 (their smallest dot). The grid is (column block, split of the contraction):
a thin weight (o_proj, down_proj) would leave most SMs idle with one program per column block,
so the contraction is split too and the float32 partials are summed by XLA (fused with the
scale). Activations may be fp8 (W8A8): fp8 values are exact in bf16, and the products are
accumulated in float32, so the result is the fp8 GEMM's.

Not yet faster than XLA's product (docs/performance.md), so ops.quant leaves it off.
Runs on GPUs through Triton and anywhere in Pallas interpret mode (the CPU tests).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

MAX_ROWS = 64  # past this a step is no longer bandwidth-bound; XLA's GEMMs take it


@dataclasses.dataclass(frozen=True)
class Config:
    block_n: int = 128
    block_k: int = 128
    programs: int = 528    # split the contraction until the grid has about this many (4 per SM)
    warps: int = 4
    stages: int = 3


def blocks(k: int, n: int, config: Config = Config()) -> tuple[int, int]:
    """(block_k, block_n): the largest powers of two up to the config's that divide k and n."""
    return _block(k, config.block_k), _block(n, config.block_n)


def _block(dim: int, most: int) -> int:
    return min(most, dim & -dim)


def supported(rows: int, k: int, n: int, config: Config = Config()) -> bool:
    return rows <= MAX_ROWS and min(blocks(k, n, config)) >= 16


def splits_for(k: int, n: int, config: Config) -> int:
    block_k, block_n = blocks(k, n, config)
    return max(1, min(k // block_k, config.programs // (n // block_n)))


def matmul(x: jax.Array, weight: jax.Array, scale: jax.Array, out_dtype=None, config: Config = Config(),
           interpret: bool | None = None) -> jax.Array:
    """x [M, K] (bf16 / f32, or fp8) @ weight [K, N] (int8 / fp8) * scale [N] -> [M, N] in
    out_dtype (default x's), accumulated in float32."""
    (m, k), n = x.shape, weight.shape[1]
    if not supported(m, k, n, config):
        raise ValueError(f"quant_matmul: unsupported x {x.shape} / weight {weight.shape} for {config}")
    rows = max(16, pl.next_power_of_2(m))
    dt = jnp.float32 if x.dtype == jnp.float32 else jnp.bfloat16
    (block_k, block_n), splits = blocks(k, n, config), splits_for(k, n, config)
    xp = jnp.pad(x, ((0, rows - m), (0, 0)))
    kernel = functools.partial(_kernel, k_blocks=k // block_k, splits=splits, block_n=block_n, block_k=block_k, dt=dt)
    partials = pl.pallas_call(
        kernel, grid=(n // block_n, splits),
        out_shape=jax.ShapeDtypeStruct((splits, rows, n), jnp.float32),
        interpret=jax.default_backend() != "gpu" if interpret is None else interpret,
        compiler_params=plt.CompilerParams(num_warps=config.warps, num_stages=config.stages),
    )(xp, weight)
    y = partials.sum(axis=0)[:m] * scale.astype(jnp.float32)
    return y.astype(out_dtype or x.dtype)


def _kernel(x_ref, w_ref, out_ref, *, k_blocks, splits, block_n, block_k, dt):
    col, split = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(col * block_n, block_n)
    first = split * k_blocks // splits
    last = (split + 1) * k_blocks // splits

    def body(i, acc):
        ks = pl.ds(i * block_k, block_k)
        return acc + plt.dot(x_ref[:, ks].astype(dt), w_ref[ks, cols].astype(dt))

    acc = jax.lax.fori_loop(first, last, body, jnp.zeros((x_ref.shape[0], block_n), jnp.float32))
    out_ref[split, :, cols] = acc
