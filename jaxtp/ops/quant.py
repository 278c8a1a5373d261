"""Which product an 8-bit weight (quantize.py) takes: the Pallas kernel (kernels/quant_matmul.py)
for decode-sized batches where KERNEL turns it on, else XLA's convert and GEMM.

The kernel runs where the attention kernels do ("pallas" mode) on a single-device tensor axis: a
Pallas call is opaque to the SPMD partitioner, and the column-parallel projections would need
their own shard_map.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from jaxtp.ops.kernels import quant_matmul

if TYPE_CHECKING:
    from jaxtp.ops import OpsConfig


KERNEL = False  # off: the kernel does not beat XLA's product yet (docs/performance.md)


def bandwidth_bound(x) -> bool:
    """A decode-sized product, which reads its weight once for a few rows. fp8 x fp8 (W8A8)
    products then run as the weight-only GEMM on the fp8 values (exact in bf16, summed in
    float32): XLA's fp8 GEMMs read these weights at half its rate (docs/performance.md; most
    likely a transpose per call, as cuBLAS's fp8 GEMMs want the weight [N, K]; not traced)."""
    return math.prod(x.shape[:-1]) <= quant_matmul.MAX_ROWS


def applies(ops: "OpsConfig | None", x, weight) -> bool:
    rows = math.prod(x.shape[:-1])
    return (KERNEL and ops is not None and ops.kernels == "pallas" and ops.mesh.shape["tp"] == 1
            and quant_matmul.supported(rows, weight.shape[0], math.prod(weight.shape[1:])))


def matmul(x, weight, scale, out_dtype):
    """x [..., K] @ weight [K, ...] * scale [...] (one scale per output channel)."""
    y = quant_matmul.matmul(x.reshape(-1, x.shape[-1]), weight.reshape(weight.shape[0], -1),
                            scale.reshape(-1), out_dtype)
    return y.reshape(*x.shape[:-1], *weight.shape[1:])
