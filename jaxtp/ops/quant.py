"""Which product an 8-bit weight (quantize.py) takes: the Pallas kernel (kernels/quant_matmul.py)
for decode-sized batches where KERNEL turns it on, else XLA's convert and GEMM.

The kernel runs where the attention kernels do ("pallas" mode) on a single-device tensor axis: a
Pallas call is opaque to the SPMD partitioner, and the column-parallel projections would need
their own shard_map.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax

from jaxtp.ops.kernels import quant_matmul

if TYPE_CHECKING:
    from jaxtp.ops import OpsConfig


KERNEL = False  # off: the kernel does not beat XLA's product yet (docs/performance.md)


def bandwidth_bound(x) -> bool:
    """A decode-sized product, which reads its weight once for a few rows."""
    return math.prod(x.shape[:-1]) <= quant_matmul.MAX_ROWS


def weight_only(x) -> bool:
    """Whether a W8A8 (fp8) product of x runs as the weight-only one: decode-sized on a GPU.
    XLA's fp8 GEMMs read these weights at half the weight-only GEMM's rate, and quantizing the
    activations first cost more than the fp8 values in the weight-only GEMM saved (Llama-2-7B
    b1: 3.835 ms against fp8_weight_only's 3.496; docs/performance.md)."""
    return jax.default_backend() == "gpu" and bandwidth_bound(x)


def applies(ops: "OpsConfig | None", x, weight) -> bool:
    rows = math.prod(x.shape[:-1])
    return (KERNEL and ops is not None and ops.kernels == "pallas" and ops.mesh.shape["tp"] == 1
            and quant_matmul.supported(rows, weight.shape[0], math.prod(weight.shape[1:])))


def matmul(x, weight, scale, out_dtype):
    """x [..., K] @ weight [K, ...] * scale [...] (one scale per output channel)."""
    y = quant_matmul.matmul(x.reshape(-1, x.shape[-1]), weight.reshape(weight.shape[0], -1),
                            scale.reshape(-1), out_dtype)
    return y.reshape(*x.shape[:-1], *weight.shape[1:])
