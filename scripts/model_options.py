"""The model flags generate.py and serve.py share, one-to-one with `jaxtp.load`'s arguments.

Plain argparse, no jax import: the scripts set XLA_FLAGS from their arguments first.
"""
import argparse
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-arith"
ALL_REDUCE_MODES = ("auto", "xla", "custom", "shard_map")  # jaxtp/ops/allreduce.py
KERNEL_MODES = ("auto", "xla", "pallas")                    # jaxtp/ops/attention.py
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")    # jaxtp/entrypoints/api.py


def add(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="HF model directory or hub id")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantization", choices=["int8", "fp8", "fp8_weight_only"], default=None,
                   help="8-bit projections: int8 or fp8 weights, fp8 also fp8 activations (jaxtp/quantize.py)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="KV pages: auto = the model's dtype; fp8 (e4m3) / fp8_e5m2 hold twice the tokens")
    p.add_argument("--all-reduce", choices=ALL_REDUCE_MODES, default="auto",
                   help="how tensor-parallel partial sums are added: auto = the one-shot NVLink kernel on "
                   "CUDA GPUs, else XLA's all-reduce (jaxtp/ops/allreduce.py)")
    p.add_argument("--kernels", choices=KERNEL_MODES, default="auto",
                   help="decode attention: auto = the Pallas kernel on GPUs, else XLA's (jaxtp/ops/attention.py)")


def load_kwargs(args: argparse.Namespace) -> dict:
    """`jaxtp.load` keyword arguments from the flags `add` defined."""
    return dict(dtype=args.dtype, quantization=args.quantization, all_reduce=args.all_reduce,
                kernels=args.kernels, kv_cache_dtype=args.kv_cache_dtype)
