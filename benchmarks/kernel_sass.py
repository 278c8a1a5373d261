"""The machine code of jaxtp's Pallas kernels for a Hopper GPU, compiled on a host without one.

Pallas lowers a kernel to Triton IR (printed by pallas_call's debug flag); the `triton` package
(`pip install triton`: a tool here, not a jaxtp dependency) compiles that IR for sm_90 offline,
with the warps and stages the kernel asked for, and its nvdisasm lists the SASS. The histogram
of memory and tensor-core instructions shows how a kernel moves its bytes (16-byte async copies,
ldmatrix, or byte-wide loads where an 8-bit operand has no transposing shared-memory load)
before a GPU is at hand to time it. Timing stays benchmark.py's job.
  python benchmarks/kernel_sass.py --kernel decode --rows 32 --kv-cache-dtype fp8
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxtp.entrypoints.api import KV_CACHE_DTYPES  # noqa: E402
from jaxtp.engine import kv_cache  # noqa: E402
from jaxtp.ops.kernels import decode_attention, prefill_attention  # noqa: E402

PAGE = 64
SHOWN = re.compile(r"\b(LDGSTS|LDG|LDSM|LDS|STS|STG|HMMA|HGMMA|F2FP|F2F|I2F|PRMT|BAR|SHFL|MUFU)[A-Z0-9._]*")


def _struct(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def lower(args) -> str:
    """The debug print of the kernel's Triton IR, then the lowered module's text (where the
    warps and stages it asked for are)."""
    cache_dtype = KV_CACHE_DTYPES[args.kv_cache_dtype] or jnp.bfloat16
    width = args.context // PAGE
    _, k_shape, v_shape = kv_cache.shape(1, args.rows * width + 1, args.kv_heads, PAGE, args.head_dim)
    pages, v_pages = _struct(k_shape, cache_dtype), _struct(v_shape, cache_dtype)
    table = _struct((args.rows, width), jnp.int32)
    ends = _struct((args.rows,), jnp.int32)
    heads = args.groups * args.kv_heads
    module = decode_attention if args.kernel == "decode" else prefill_attention
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        original = module.pl.pallas_call
        module.pl.pallas_call = lambda *a, **k: original(*a, **{**k, "debug": True})
        try:
            if args.kernel == "decode":
                qkv = _struct((args.rows, heads + 2 * args.kv_heads, args.head_dim), jnp.bfloat16)
                cos = _struct((args.rows, args.head_dim), jnp.float32)
                fn = jax.jit(lambda *a: decode_attention.attend(*a, num_heads=heads, interpret=False))
                lowered = fn.trace(qkv, cos, cos, pages, v_pages, table, ends, ends)
            else:
                q = _struct((args.rows, args.chunk, heads, args.head_dim), jnp.bfloat16)
                fn = jax.jit(lambda *a: prefill_attention.attend(*a, interpret=False))
                lowered = fn.trace(q, pages, v_pages, table, ends)
            text = lowered.lower(lowering_platforms=("cuda",)).as_text()
        finally:
            module.pl.pallas_call = original
    return printed.getvalue() + "\n" + text


def triton_ir(printed: str) -> str:
    """The printed Triton module without its location annotations (triton's parser wants none)."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("module @"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("}"))
    ir = "\n".join(lines[start:end + 1]).replace(" [unknown]", "")
    ir = re.sub(r' "[^"\n]*"\(#loc\d+\)', "", ir)
    return re.sub(r" #loc\d*", "", re.sub(r"^module @\w+", "module", ir))


def launch_options(printed: str) -> dict:
    """The warps and stages the kernel's pallas_call asked for (in the lowered custom call)."""
    return {k: int(re.search(rf"{k} = (\d+)", printed).group(1)) for k in ("num_warps", "num_stages")}


def sass(printed: str, sm: int, name: str) -> str:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    import triton
    from triton.backends.compiler import GPUTarget
    options = launch_options(printed)
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "kernel.ttir", Path(tmp) / "kernel.cubin"
        src.write_text(triton_ir(printed))
        compiled = triton.compile(str(src), target=GPUTarget("cuda", sm, 32), options=options)
        cubin.write_bytes(compiled.asm["cubin"])
        nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
        code = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    print(f"{name}: num_warps {options['num_warps']}, num_stages {options['num_stages']}, "
          f"shared memory {compiled.metadata.shared} bytes")
    return code


def histogram(code: str, top: int) -> None:
    instructions = [line for line in code.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    counts = collections.Counter(m.group(0) for line in instructions for m in [SHOWN.search(line)] if m)
    print(f"{len(instructions)} instructions; memory, conversion and tensor-core ones:")
    for name, n in counts.most_common(top):
        print(f"{n:6d}  {name}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", choices=["decode", "prefill"], default="decode")
    p.add_argument("--rows", type=int, default=32, help="decode rows, or prefill rows of --chunk queries")
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--groups", type=int, default=1, help="query heads per KV head")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--context", type=int, default=1024, help="positions per row's block table")
    p.add_argument("--chunk", type=int, default=256, help="prefill queries per row")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    p.add_argument("--sm", type=int, default=90, help="compute capability, e.g. 90 (Hopper)")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--save", type=Path, help="write the whole SASS listing here")
    args = p.parse_args()
    code = sass(lower(args), args.sm, args.kernel)
    if args.save:
        args.save.write_text(code)
    histogram(code, args.top)
