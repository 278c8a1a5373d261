"""CUDA kernels that XLA cannot generate, built on first use with nvcc and loaded as XLA FFI calls.

Each `<name>.cu` here is compiled once per (source, jax headers, GPU architecture) into
`$JAXTP_CACHE` (default ~/.cache/jaxtp/kernels) and reused after that, the way Triton caches
its kernels. Nothing here runs on CPU-only machines; callers fall back to XLA's own ops.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import jax

HERE = Path(__file__).resolve().parent


class BuildError(RuntimeError):
    """A kernel could not be built or loaded here (no nvcc, no CUDA GPU, compiler error)."""


def nvcc() -> str:
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise BuildError("nvcc (the CUDA compiler) was not found: put it on PATH or set NVCC / CUDA_HOME")


def cache_dir() -> Path:
    return Path(os.environ.get("JAXTP_CACHE", Path.home() / ".cache" / "jaxtp")) / "kernels"


def build(name: str, arch: str) -> ctypes.CDLL:
    """Compile kernels/<name>.cu for compute capability `arch` ("90" for Hopper) and load it."""
    source = HERE / f"{name}.cu"
    include = jax.ffi.include_dir()
    key = hashlib.sha256(source.read_bytes() + f"{include}|{jax.__version__}|{arch}".encode()).hexdigest()
    lib = cache_dir() / f"{name}-sm{arch}-{key[:16]}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [nvcc(), "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-w",
               f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-I{include}", str(source), "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise BuildError(f"building {source.name} failed:\n{' '.join(cmd)}\n{done.stderr[-4000:]}")
        os.replace(tmp, lib)  # atomic: concurrent builders never load a half-written library
    try:
        return ctypes.CDLL(str(lib))
    except OSError as e:
        raise BuildError(f"loading {lib} failed: {e}") from e
