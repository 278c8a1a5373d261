"""Hugging Face checkpoint -> orbax checkpoint that `jaxtp.load` restores at any tp.

    python scripts/convert.py MODEL OUT [--tp N] [--dtype auto|float32|bfloat16|float16]

The model is loaded sharded over tp devices and its tp-independent arrays are saved with orbax
(see jaxtp/checkpoint.py), with config.json, generation_config.json and the tokenizer files.
`jaxtp.load(OUT, tp=M)` then restores each device's part directly, for any valid M.
"""
import argparse
import os
import time
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="HF model dir or hub id")
    p.add_argument("out", type=Path, help="new directory for the orbax checkpoint")
    p.add_argument("--tp", type=int, default=1, help="devices to shard over while converting")
    p.add_argument("--dtype", default="auto", help="dtype saved (auto: the checkpoint's own)")
    p.add_argument("--cpu-devices", type=int, default=8, help="simulated devices on a CPU-only host")
    a = p.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={a.cpu_devices}").strip()
    import jax.numpy as jnp
    import jaxtp
    from jaxtp import checkpoint

    t0 = time.perf_counter()
    model = jaxtp.load(a.model, tp=a.tp, dtype=a.dtype, memory_fraction=1.0)
    t1 = time.perf_counter()
    checkpoint.save(model.params, model.config, model.mesh, model.path, a.out, jnp.dtype(model.dtype).name)
    print(f"converted {model.path} -> {a.out} ({jnp.dtype(model.dtype).name}, tp={a.tp}): load "
          f"{t1 - t0:.1f} s, save {time.perf_counter() - t1:.1f} s")


if __name__ == "__main__":
    main()
