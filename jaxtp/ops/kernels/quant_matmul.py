"""A Mosaic GPU (Hopper) product of a few activation rows with an 8-bit weight stored [N, K]
(outputs x inputs), for the decode steps' wide projections (q|k|v, gate|up).

The weight tile is the WGMMA's A operand: loaded from shared memory into registers, converted
there and multiplied without a second trip through shared memory (XLA's fused convert takes
that trip). The activations are the B operand, read transposed from their [rows, K] tile. The
grid is (block of N, split of K), so that a weight of few blocks still fills the SMs; XLA sums
the float32 partials [splits, N, rows] together with the scale and the transpose.

int8 converts to bf16. fp8 (e4m3) converts to f16, which the hardware does two values an
instruction (to bf16 only through f32), so the activations go in as f16, clipped to its range.
Hopper only (wgmma); checked on the GPU by benchmarks/quant_matmul.py.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

MAX_ROWS = 64  # past this a step is no longer bandwidth-bound; XLA's GEMMs take it
F16_MAX = 65504.0


@dataclasses.dataclass(frozen=True)
class Config:
    block_n: int = 64      # weight rows (outputs) per program: one warpgroup's WGMMA M
    block_k: int = 128
    programs: int = 528    # split the contraction until the grid has about this many (4 per SM)
    stages: int = 4


def rows_for(m: int) -> int:
    """Activation rows padded to a WGMMA N: 8, 16, 32 or 64."""
    return max(8, pl.next_power_of_2(m))


def block_k_for(k: int, config: Config = Config()) -> int:
    """The config's block_k, or the largest power of two that divides k if smaller."""
    return min(config.block_k, k & -k)


def splits_for(n: int, k: int, config: Config = Config()) -> int:
    """The most splits of K's blocks, dividing them evenly, that keep the grid within programs."""
    k_blocks = k // block_k_for(k, config)
    fits = [s for s in range(1, k_blocks + 1) if k_blocks % s == 0 and n // config.block_n * s <= config.programs]
    return max(fits, default=1)


def supported(m: int, n: int, k: int, config: Config = Config()) -> bool:
    return m <= MAX_ROWS and n % config.block_n == 0 and block_k_for(k, config) >= 32  # a 32-byte swizzle


def dot_dtype(weight_dtype):
    return jnp.float16 if weight_dtype == jnp.float8_e4m3fn else jnp.bfloat16


def matmul(x: jax.Array, weight_t: jax.Array, scale: jax.Array, out_dtype=None,
           config: Config = Config()) -> jax.Array:
    """x [M, K] @ weight_t [N, K].T (int8 / fp8 e4m3) * scale [N] -> [M, N] in out_dtype
    (default x's), accumulated in float32."""
    (m, k), n = x.shape, weight_t.shape[0]
    if not supported(m, n, k, config):
        raise ValueError(f"quant_matmul: unsupported x {x.shape} / weight {weight_t.shape} for {config}")
    dt = dot_dtype(weight_t.dtype)
    xs = jnp.clip(x, -F16_MAX, F16_MAX) if dt == jnp.float16 else x
    xp = jnp.pad(xs.astype(dt), ((0, rows_for(m) - m), (0, 0)))
    partials = _partials(xp, weight_t, splits_for(n, k, config), config)
    y = partials.sum(axis=0).T[:m] * scale.astype(jnp.float32)
    return y.astype(out_dtype or x.dtype)


def _partials(x, weight_t, splits: int, config: Config):
    """float32 [splits, N, rows]: each split's product over its share of K's blocks."""
    (rows, k), n = x.shape, weight_t.shape[0]
    block_n, block_k = config.block_n, block_k_for(k, config)
    steps = k // block_k // splits

    def body(w_gmem, x_gmem, out_gmem, out_smem):
        col, split = lax.axis_index("n"), lax.axis_index("s")

        def accumulate(acc_ref):
            def step(_, w_smem, x_smem):
                plgpu.wgmma(acc_ref, w_smem[...].astype(x.dtype), plgpu.transpose_ref(x_smem, (1, 0)))
                plgpu.wgmma_wait(0)  # the A operand lives in registers until the product is done

            plgpu.emit_pipeline(
                step, grid=(steps,), max_concurrent_steps=config.stages,
                in_specs=[plgpu.BlockSpec((block_n, block_k), lambda i: (col, split * steps + i)),
                          plgpu.BlockSpec((rows, block_k), lambda i: (0, split * steps + i))],
            )(w_gmem, x_gmem)
            return acc_ref[...]

        out_smem[...] = pl.run_scoped(accumulate, plgpu.ACC((block_n, rows)))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[split, pl.ds(col * block_n, block_n)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((splits, n, rows), jnp.float32),
        grid=(n // block_n, splits), grid_names=("n", "s"),
        scratch_types=dict(out_smem=plgpu.SMEM((block_n, rows), jnp.float32)),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return kernel(weight_t, x)
