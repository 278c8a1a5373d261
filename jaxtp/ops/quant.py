"""Which product an 8-bit weight (quantize.py) takes: the Mosaic GPU kernel
(kernels/quant_matmul.py) for the decode batches of 17-32 rows of weights stored [out, in], else
XLA's convert and GEMM (faster at fewer rows; more rows were not measured).

The kernel runs where the attention kernels do ("pallas" mode), on a Hopper GPU, on a one-device
mesh: a Pallas call is opaque to the SPMD partitioner, and the column-parallel projections
would need their own shard_map.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jaxtp.ops.kernels import quant_matmul

if TYPE_CHECKING:
    from jaxtp.ops import OpsConfig


KERNEL = True  # False: every 8-bit product in XLA (benchmark.py --no-quant-kernel)
KERNEL_ROWS = (17, 32)  # where the kernel beat XLA's product on [out, in] weights (docs/performance.md)


def bandwidth_bound(x) -> bool:
    """A decode-sized product, which reads its weight once for a few rows."""
    return math.prod(x.shape[:-1]) <= quant_matmul.MAX_ROWS


def weight_only(x) -> bool:
    """Whether a W8A8 (fp8) product of x runs as the weight-only one: decode-sized on a GPU.
    XLA's fp8 GEMMs read these weights at half the weight-only GEMM's rate, and quantizing the
    activations first cost more than the fp8 values in the weight-only GEMM saved (Llama-2-7B
    b1: 3.835 ms against fp8_weight_only's 3.496; docs/performance.md)."""
    return jax.default_backend() == "gpu" and bandwidth_bound(x)


def applies(ops: "OpsConfig | None", x, weight_t) -> bool:
    """Whether x's product with weight_t [..., K] (an 8-bit weight stored [out, in]) runs in the
    kernel: bf16 activations only, as its tensor cores take them (float32 keeps XLA's product)."""
    rows, n = math.prod(x.shape[:-1]), math.prod(weight_t.shape[:-1])
    return (KERNEL and ops is not None and ops.kernels == "pallas" and ops.mesh.size == 1 and _hopper()
            and x.dtype == jnp.bfloat16
            and KERNEL_ROWS[0] <= rows <= KERNEL_ROWS[1] and quant_matmul.supported(rows, n, weight_t.shape[-1]))


def _hopper() -> bool:
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


def matmul(x, weight_t, scale, out_dtype):
    """x [..., K] @ weight_t [..., K] (its leading axes the outputs) * scale [...]."""
    y = quant_matmul.matmul(x.reshape(-1, x.shape[-1]), weight_t.reshape(-1, weight_t.shape[-1]),
                            scale.reshape(-1), out_dtype)
    return y.reshape(*x.shape[:-1], *weight_t.shape[:-1])
