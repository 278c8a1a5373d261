"""How the partial sums of row-parallel layers (o_proj, down_proj) are added up over `tp`.

A decode step of an L-layer model all-reduces 2L small activations ([batch, hidden], 8 KB at
batch 1). Through XLA each is an NCCL all-reduce whose fixed cost, whatever its size, cancels
much of what splitting the weights saves (docs/performance.md). So the row-parallel matmul can instead run
under `shard_map` and hand its partial sum to a one-shot NVLink all-reduce (kernels/all_reduce.cu,
an XLA FFI call): each GPU writes its block straight into its peers' memory and sums what they
wrote, one kernel and one round trip. Inputs above MAX_BYTES (prefill) keep NCCL.

Modes (`jaxtp.load(..., all_reduce=...)`, kept in the model's OpsConfig, static in the jitted steps):

  "xla"        weights and activations carry shardings; the SPMD partitioner inserts NCCL
               all-reduces. Used wherever the others do not apply.
  "custom"     the one-shot kernel. Needs CUDA GPUs that reach each other peer-to-peer, one
               process, pp = dp = 1, and nvcc on first use (the kernel is built and cached).
  "shard_map"  the same shard_map with `lax.psum`: the custom path's plumbing, testable on CPU.
  "auto"       "custom" where it applies (tp > 1), else "xla".

Every mode adds the same terms; with 2 GPUs all three give bitwise-equal sums.
"""
from __future__ import annotations

import ctypes
import logging
from typing import TYPE_CHECKING, Callable

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxtp.ops import kernels

if TYPE_CHECKING:
    from jaxtp.ops import OpsConfig

MODES = ("auto", "xla", "custom", "shard_map")
MAX_BYTES = 1 << 20  # per-device input size up to which the custom kernel is used (batch <= 128 at d=4096)
TARGET = "jaxtp_all_reduce"
TARGET_ADD_NORM = "jaxtp_all_reduce_add_norm"  # the sum fused with the residual add and RMSNorm

_library: ctypes.CDLL | None = None
_log = logging.getLogger(__name__)


def resolve(mode: str, mesh: Mesh) -> str:
    """The mode a model on `mesh` runs with; "custom" is set up here (built, buffers allocated)."""
    if mode not in MODES:
        raise ValueError(f"all_reduce must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if mesh.shape["tp"] == 1 or mode == "xla":
        return "xla"  # nothing to reduce
    unsupported = _unsupported(mesh, custom=mode in ("auto", "custom"))
    if mode == "auto":
        if unsupported is None:
            try:
                setup(mesh)
                return "custom"
            except Exception as e:  # noqa: BLE001 - whatever stops the kernel, XLA's all-reduce works
                unsupported = f"{type(e).__name__}: {e}"
        if jax.default_backend() == "gpu":
            _log.warning("custom all-reduce unavailable (%s); using XLA's NCCL all-reduce", unsupported)
        return "xla"
    if unsupported is not None:
        raise ValueError(f"all_reduce={mode!r} cannot run here: {unsupported}")
    if mode == "custom":
        setup(mesh)
    return mode


def _unsupported(mesh: Mesh, custom: bool) -> str | None:
    if mesh.shape["pp"] > 1 or mesh.shape["dp"] > 1:
        return (f"it needs pipeline_parallel_size = data_parallel_size = 1 (got pp={mesh.shape['pp']}, "
                f"dp={mesh.shape['dp']})")
    if not custom:
        return None
    platforms = {d.platform for d in mesh.devices.flat}
    if platforms != {"gpu"}:
        return f"it needs CUDA GPUs, the mesh is on {', '.join(sorted(platforms))}"
    if jax.process_count() > 1:
        return "it needs a single process (peer-to-peer buffers are per process)"
    return None


def setup(mesh: Mesh) -> None:
    """Build and load the kernel, register it with XLA and allocate its buffers on the mesh's GPUs
    (one tp group: `resolve` allows the kernel only with pp = dp = 1)."""
    global _library
    if _library is None:
        major, minor = str(mesh.devices.flat[0].compute_capability).split(".")
        lib = kernels.build("all_reduce", f"{major}{minor}")
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxtpAllReduce), platform="CUDA")
        jax.ffi.register_ffi_target(TARGET_ADD_NORM, jax.ffi.pycapsule(lib.JaxtpAllReduceAddNorm),
                                    platform="CUDA")
        lib.jaxtp_ar_error.restype = ctypes.c_char_p
        lib.jaxtp_ar_init.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int64]
        _library = lib
    ordinals = np.array([d.local_hardware_id for d in mesh.devices.flat], np.int32)
    if _library.jaxtp_ar_init(ordinals.ctypes.data_as(ctypes.POINTER(ctypes.c_int)), ordinals.size, MAX_BYTES):
        raise kernels.BuildError(f"custom all-reduce setup failed: {_library.jaxtp_ar_error().decode()}")


def _manual(ops: "OpsConfig | None") -> bool:
    """Whether the sum is ours (shard_map); else XLA's partitioner inserts the all-reduce."""
    return ops is not None and ops.all_reduce != "xla"


def row_parallel(ops: "OpsConfig | None", matmul: Callable, x, weight, scale=None, transposed: bool = False):
    """matmul(x, weight, scale) for a weight split on its input axis over tp, summed over tp.
    The weight is [in, out], or [out, in] if `transposed` (8-bit, quantize.py).

    Without ops (or in "xla" mode) this is the plain matmul and XLA inserts the all-reduce.
    """
    if not _manual(ops):
        return matmul(x, weight, scale)
    mode = ops.all_reduce
    return _over_tp(ops.mesh, lambda x, w, s: _sum(matmul(x, w, s), mode), P(), transposed, x, weight, scale)


def row_parallel_add_norm(ops: "OpsConfig | None", matmul: Callable, x, weight, scale, residual,
                          norm_weight, eps: float, norm: Callable, transposed: bool = False):
    """(residual + row_parallel(matmul, x, weight, scale), norm(that, norm_weight, eps)).

    A decoder layer follows each row-parallel sum with a residual add and an RMSNorm; in "custom"
    mode all three are one kernel (kernels/all_reduce.cu, one_shot_add_norm) instead of four
    (the all-reduce, the add, the norm's reduction and its scaling). `norm` is the same RMSNorm
    in jnp, used by every other mode.
    """
    if not _manual(ops):
        new = residual + matmul(x, weight, scale)
        return new, norm(new, norm_weight, eps)
    mode = ops.all_reduce

    def local(x, w, s, residual, norm_weight):
        return _add_norm(matmul(x, w, s), residual, norm_weight, eps, norm, mode)
    return _over_tp(ops.mesh, local, (P(), P()), transposed, x, weight, scale, residual, norm_weight)


def _over_tp(mesh: Mesh, fn: Callable, out_specs, transposed: bool, x, weight, scale, *replicated):
    """shard_map of fn(x block, weight block, scale, *replicated) over tp: x and weight split on
    the contracted axis ([..., in/tp] and [in/tp, out], or [out, in/tp] if transposed); scale
    (8-bit weights' per-output-channel scale, or None) and `replicated` whole on every device."""
    def local(x, weight, *rest):
        return fn(x, weight, *rest) if scale is not None else fn(x, weight, None, *rest)

    args = (x, weight) + ((scale,) if scale is not None else ()) + replicated
    w_spec = P(None, "tp") if transposed else P("tp", None)
    specs = (P(*[None] * (x.ndim - 1), "tp"), w_spec) + (P(),) * (len(args) - 2)
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=False)(*args)


def _add_norm(partial, residual, norm_weight, eps: float, norm: Callable, mode: str):
    """Inside shard_map: (residual + the sum over tp of `partial`, norm of that)."""
    if (_fits(partial, mode) and residual.dtype == partial.dtype == norm_weight.dtype
            and norm_weight.nbytes % 16 == 0):
        out = jax.ShapeDtypeStruct(residual.shape, residual.dtype)
        return jax.ffi.ffi_call(TARGET_ADD_NORM, (out, out))(partial, residual, norm_weight,
                                                              eps=np.float32(eps))
    new = residual + _sum(partial, mode)
    return new, norm(new, norm_weight, eps)


def _fits(partial, mode: str) -> bool:
    """Whether the custom kernel takes this partial sum (prefill-sized ones go to NCCL)."""
    return mode == "custom" and partial.nbytes <= MAX_BYTES and partial.nbytes % 16 == 0


def _sum(partial, mode: str):
    """Inside shard_map: the sum over tp of each device's `partial`."""
    if _fits(partial, mode):
        return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(partial.shape, partial.dtype))(partial)
    return jax.lax.psum(partial, "tp")
