"""XLA flags jaxtp turns on by default, each for a measured reason (docs/performance.md, "XLA
flags"). They are put in XLA_FLAGS when jaxtp is imported, which must happen before jax starts
its backend (the first computation or `jax.devices()`) to have an effect. A flag the user
already set in XLA_FLAGS is left alone.

--xla_gpu_disable_async_collectives=ALLREDUCE,ALLGATHER
    Async collectives run on side streams that the decode step's main stream waits for; with
    the row-parallel sums in the one-shot kernel (ops/allreduce.py), the ones left (the
    vocab-split embedding's all-reduce and the logits' all-gather) gain nothing from overlap.

--xla_gpu_enable_command_buffer=+COLLECTIVES
    XLA runs sequences of kernels as CUDA graphs, but by default a collective ends a graph; with
    tp > 1 the decode step then launches its hundreds of kernels one by one, each after a gap.

--xla_gpu_autotune_level=1
    GEMM autotuning without its correctness checks of every candidate (level 4), which are most
    of a cold start's compile time (a server's warm-up 39 -> 29 s on an H200, the same step
    speed and greedy / logits parity with transformers). Level 0 (no autotuning) is much slower.
"""
from __future__ import annotations

import os

DEFAULTS = ("--xla_gpu_disable_async_collectives=ALLREDUCE,ALLGATHER",
            "--xla_gpu_enable_command_buffer=+COLLECTIVES", "--xla_gpu_autotune_level=1")


def apply() -> None:
    # jax's GPU allocator takes 75% of a device unless told; jaxtp's memory_fraction (vLLM's
    # gpu_memory_utilization) is a share of the whole device, the KV pool's room.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    current = os.environ.get("XLA_FLAGS", "")
    missing = [f for f in DEFAULTS if f.split("=")[0] not in current]
    if missing:
        os.environ["XLA_FLAGS"] = " ".join([*missing, current]).strip()


def compilation_cache_dir() -> str | None:
    """Where compiled programs persist across runs, so a restart skips compiling:
    $JAXTP_COMPILATION_CACHE, else $JAXTP_CACHE/xla (default ~/.cache/jaxtp/xla); "" turns it off."""
    chosen = os.environ.get("JAXTP_COMPILATION_CACHE")
    if chosen is not None:
        return chosen or None
    return os.path.join(os.environ.get("JAXTP_CACHE", os.path.expanduser("~/.cache/jaxtp")), "xla")


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache in compilation_cache_dir(), unless the user set one."""
    import jax
    where = compilation_cache_dir()
    if where and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", where)
