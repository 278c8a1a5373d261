"""Check and time jaxtp's one-shot all-reduce (kernels/all_reduce.cu) against XLA's psum (NCCL).

    python scripts/gpu/all_reduce_check.py --tp 2

For each size and dtype: fresh random inputs per device, the custom sum compared with psum's
(bitwise at tp=2, where both add two terms once), then `--chain` dependent all-reduces in one
jitted program, timed (median of --reps), giving microseconds per all-reduce. A last loop runs
many thousands of calls and checks the result again (a lost flag would hang or corrupt it).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


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

    from jaxtp import allreduce
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

    print(f"\n{'dtype':>9} {'bytes':>9} {'equal':>6} " + " ".join(f"{m + ' us':>12}" for m in modes))
    for dtype, nbytes, same, timing in rows:
        print(f"{dtype:>9} {nbytes:>9} {str(same):>6} " + " ".join(f"{timing[m]:>12.2f}" for m in modes))


if __name__ == "__main__":
    main()
