"""Check and time jaxtp's one-shot all-reduce (jaxtp/ops/kernels/all_reduce.cu) against XLA's psum (NCCL).

    python benchmarks/all_reduce_check.py --tp 2

For each size and dtype: fresh random inputs per device, the custom sum compared with psum's
(bitwise at tp=2, where both add two terms once), then `--chain` dependent all-reduces in one
jitted program, timed (median of --reps), giving microseconds per all-reduce. A last loop runs
many thousands of calls and checks the result again (a lost flag would hang or corrupt it).
Then the all-reduce fused with the residual add and RMSNorm (allreduce._add_norm) against the
same three steps unfused, at decode row counts: agreement and microseconds per call.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8 * 4096, 32 * 4096, 128 * 4096])
    p.add_argument("--chain", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--modes", nargs="+", default=["custom", "shard_map"])
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxtp.ops import allreduce
    from jaxtp.sharding import make_mesh

    mesh = make_mesh(tp=args.tp)
    modes = [allreduce.resolve(m, mesh) for m in args.modes]
    print(f"devices: {jax.devices()[0].device_kind} x{args.tp}; modes {modes}", flush=True)

    def program(mode, chain):
        def local(x):  # x: this device's [n] block
            for _ in range(chain):
                x = allreduce._sum(x, mode) * jnp.asarray(0.5, x.dtype)
            return x
        return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("tp"), out_specs=P("tp"), check_vma=False))

    rows = []
    for dtype in (jnp.bfloat16, jnp.float32):
        for n in args.sizes:
            key = jax.random.key(n)
            x = jax.device_put(jax.random.normal(key, (args.tp * n,), dtype), NamedSharding(mesh, P("tp")))
            blocks = np.asarray(x.astype(jnp.float32)).reshape(args.tp, n)
            want = blocks.sum(0)
            outs = {}
            for mode in modes:
                once = np.asarray(program(mode, 1)(x).astype(jnp.float32)).reshape(args.tp, n) * 2
                assert (once == once[0]).all(), f"{mode}: ranks disagree"
                outs[mode] = once[0]
                err = np.abs(once[0] - want).max() / np.abs(want).max()
                assert err < 1e-2, f"{mode} {dtype.__name__} n={n}: relative error {err}"
            same = len({o.tobytes() for o in outs.values()}) == 1
            timing = {}
            for mode in modes:
                f = program(mode, args.chain)
                f(x).block_until_ready()
                times = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    f(x).block_until_ready()
                    times.append(time.perf_counter() - t0)
                timing[mode] = statistics.median(times) / args.chain * 1e6
            rows.append((jnp.dtype(dtype).name, n * jnp.dtype(dtype).itemsize, same, timing))
            print(rows[-1], flush=True)

    if "custom" in modes:  # many calls: a lost or stale flag would hang or corrupt the sum
        x = jax.device_put(jax.random.normal(jax.random.key(7), (args.tp * 4096,), jnp.bfloat16),
                           NamedSharding(mesh, P("tp")))
        f, g = program("custom", 256), program(modes[-1], 256)
        for _ in range(40):
            y = f(x)
        y.block_until_ready()
        ok = np.array_equal(np.asarray(f(x)), np.asarray(g(x)))
        print(f"stress: 10496 custom all-reduces done; final result equal to {modes[-1]}: {ok}", flush=True)

    fused = check_add_norm(args, mesh, modes) if "custom" in modes else []

    print(f"\n{'dtype':>9} {'bytes':>9} {'equal':>6} " + " ".join(f"{m + ' us':>12}" for m in modes))
    for dtype, nbytes, same, timing in rows:
        print(f"{dtype:>9} {nbytes:>9} {str(same):>6} " + " ".join(f"{timing[m]:>12.2f}" for m in modes))
    for line in fused:
        print(line)


def check_add_norm(args, mesh, modes, d: int = 4096):
    """The fused all-reduce + residual add + RMSNorm against unfused custom sum + jnp and psum."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxtp.ops import allreduce
    from jaxtp.model import rms_norm

    def program(fused: bool, mode: str, chain: int):
        def local(x, res, w):  # x: this device's partial [rows, d]
            for _ in range(chain):
                if fused:
                    res, h = allreduce._add_norm(x, res, w, 1e-5, rms_norm, mode)
                else:  # the same steps, never fused: the sum alone, then add and norm in jnp
                    res = res + allreduce._sum(x, mode)
                    h = rms_norm(res, w, 1e-5)
                x = h * jnp.asarray(0.5, h.dtype)
            return res, h
        spec = (P("tp"), P(), P())
        return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=(P(), P()), check_vma=False))

    lines = [f"\nall-reduce + add + RMSNorm (d={d}): us per call, chain of {args.chain}"]
    for rows in (1, 2, 32):
        k1, k2, k3 = jax.random.split(jax.random.key(rows), 3)
        x = jax.device_put(jax.random.normal(k1, (args.tp * rows, d), jnp.bfloat16), NamedSharding(mesh, P("tp")))
        res = jax.device_put(jax.random.normal(k2, (rows, d), jnp.bfloat16), NamedSharding(mesh, P()))
        w = jax.device_put(1 + 0.1 * jax.random.normal(k3, (d,), jnp.bfloat16), NamedSharding(mesh, P()))
        got = [np.asarray(a.astype(jnp.float32)) for a in program(True, "custom", 1)(x, res, w)]
        ref = [np.asarray(a.astype(jnp.float32)) for a in program(False, "shard_map", 1)(x, res, w)]
        residual_equal = np.array_equal(got[0], ref[0])
        diff = np.abs(got[1] - ref[1])
        ulp = np.abs(ref[1]) * 2.0 ** -7 + 1e-6  # one bf16 step
        timing = {}
        for name, f in (("fused", program(True, "custom", args.chain)),
                        ("custom+jnp", program(False, "custom", args.chain)),
                        ("psum+jnp", program(False, "shard_map", args.chain))):
            f(x, res, w)[0].block_until_ready()
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                f(x, res, w)[0].block_until_ready()
                times.append(time.perf_counter() - t0)
            timing[name] = statistics.median(times) / args.chain * 1e6
        lines.append(f"rows {rows:>3}: residual bitwise equal {residual_equal}; normed within one bf16 step "
                     f"{bool((diff <= ulp).all())} ({int((diff > 0).sum())} of {diff.size} differ); "
                     + ", ".join(f"{k} {v:.2f}" for k, v in timing.items()))
        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
