"""A Pallas (Triton) kernel for what follows a decode step's row-parallel projection at tp = 1:
the sum of its split-contraction partial products, the residual add, and the RMSNorm.

For o_proj and down_proj at batch 1 ([2, 4096 or 11008] x [.., 4096]) XLA splits the
contraction 8 ways so that enough programs stream the weight, then sums the float32 partials
and adds the residual in one kernel and runs the RMSNorm in another, ~1.5-1.7 us each on an
H200 whatever their few bytes. Here the model splits the contraction itself (a batched matmul
with float32 partials, decode_ops.row_add_norm) and this one kernel does the rest: a program
per row loads its K partial rows at once, adds them, adds the residual and normalizes, rounding
where the model's jnp path (model.rms_norm) rounds.

Runs on GPUs through Triton and anywhere in Pallas interpret mode (the CPU tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


def add_norm(partials: jax.Array, residual: jax.Array, weight: jax.Array, eps: float, warps: int = 16,
             interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """partials float32 [K, R, N] (a matmul's output split along its contraction), residual
    [R, N], weight [N] -> (new = residual + sum of the partials rounded to residual's dtype,
    rms_norm(new) * weight), both [R, N] in residual's dtype."""
    k, r, n = partials.shape
    if residual.shape != (r, n) or weight.shape != (n,):
        raise ValueError(f"add_norm: partials {partials.shape}, residual {residual.shape} and weight "
                         f"{weight.shape} do not match")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    block, dt, f32 = pl.next_power_of_2(n), residual.dtype, jnp.float32

    def kernel(p_ref, res_ref, w_ref, new_ref, normed_ref):
        row = pl.program_id(0)
        cols = jnp.arange(block) < n
        at = lambda ref: ref.at[row, pl.ds(0, block)]  # noqa: E731 - this program's row
        parts = [plt.load(p_ref.at[jnp.int32(i), row, pl.ds(0, block)], mask=cols, other=0) for i in range(k)]
        y = functools.reduce(jnp.add, parts).astype(dt)                # the projection's output
        new = (plt.load(at(res_ref), mask=cols, other=0).astype(f32) + y.astype(f32)).astype(dt)
        x32 = new.astype(f32)
        normed = (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32) / n + eps)).astype(dt)
        w = plt.load(w_ref.at[pl.ds(0, block)], mask=cols, other=0)
        plt.store(at(new_ref), new, mask=cols)
        plt.store(at(normed_ref), (w.astype(f32) * normed.astype(f32)).astype(dt), mask=cols)

    out = jax.ShapeDtypeStruct((r, n), dt)
    return pl.pallas_call(
        kernel, grid=(r,), out_shape=(out, out), interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=1),
    )(partials, residual, weight.astype(dt))
