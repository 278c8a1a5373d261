"""Decode / prefill throughput of jaxtp at real model shapes, against the HBM roofline.

    python benchmarks/benchmark.py --shape llama2-7b --tp 1 2 --batch 1 32 --ctx 1024

Random bf16 weights are generated on device in their shardings (no checkpoint needed). For each
tp and batch it prefills `ctx` tokens per row, then times `--steps`-token decode chunks from that
point (median of --reps; by default chunks are queued back to back, see --chunks). The roofline
is the bytes one decode step must read per GPU (its weight shard + its live KV cache) divided
by the HBM bandwidth measured in the same run (the best of a copy and a full read, before and
after the configurations); `roofline` = that floor / measured ms per step.
"""
import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's jaxtp, installed or not

from jaxtp.entrypoints.api import KV_CACHE_DTYPES  # noqa: E402
from jaxtp.ops import allreduce, attention, quant  # noqa: E402  (no jax backend starts here)
from jaxtp.ops.kernels.decode_attention import Config as DecodeConfig  # noqa: E402

SHAPES = {  # config.json fields of well-known models
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "llama3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                        max_position_embeddings=131072,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama2-7b", help=f"{'|'.join(SHAPES)} or a config.json path")
    p.add_argument("--tp", type=int, nargs="+", default=[1])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--ctx", type=int, default=1024, help="context length before decoding")
    p.add_argument("--steps", type=int, default=32, help="decode steps per timed chunk")
    p.add_argument("--page-size", type=int, default=64, help="tokens per KV page")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--chunks", choices=["queued", "sync"], default="queued",
                   help="queued: each decode chunk is dispatched before the last one is waited for "
                        "(time between chunk ends); sync: dispatch, wait, repeat (host time per chunk counts)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--no-prefill", action="store_true", help="skip timing prefill")
    p.add_argument("--quantization", choices=["int8", "fp8", "fp8_weight_only"], default=None,
                   help="8-bit projections (jaxtp/quantize.py)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="KV pages' dtype (auto: the model's)")
    p.add_argument("--no-quant-kernel", action="store_true",
                   help="8-bit decode products all in XLA, not the Mosaic GPU kernel where ops.quant takes it")
    p.add_argument("--all-reduce", nargs="+", default=["auto"], choices=allreduce.MODES,
                   help="all-reduce modes to time at tp > 1 (jaxtp/ops/allreduce.py); each is checked to "
                   "give the same greedy tokens")
    p.add_argument("--kernels", nargs="+", default=["auto"], choices=attention.MODES,
                   help="decode kernel modes to time (jaxtp/ops/attention.py); each is checked to give "
                   "the same greedy tokens")
    p.add_argument("--decode-kernel", nargs="+", default=[decode_config("default")], type=decode_config,
                   metavar="FIELD=N,...", help="decode kernel tilings to run, each 'default' or decode_attention.Config fields "
                        "(e.g. warps=2,stages=4)")
    p.add_argument("--engine", type=int, default=0, metavar="TOKENS",
                   help="also time the Engine's own loop (jaxtp.generate's: 16-step chunks queued "
                        "ahead, host bookkeeping) generating TOKENS per row after one prefill (0: not run)")
    p.add_argument("--json", help="write results here")
    p.add_argument("--trace", help="profile one more prefill call and decode chunk per config into this directory "
                   "and print its per-kernel summary (benchmarks/trace_summary.py)")
    p.add_argument("--cpu-devices", type=int, default=8, help="simulated devices on a CPU-only host")
    p.add_argument("--bandwidth-mib", type=int, default=2048, help="array size for the bandwidth measurement")
    return p.parse_args(argv)


def decode_config(spec: str):
    """'default' or 'field=N,...' -> (spec, decode_attention.Config)."""
    if spec == "default":
        return spec, DecodeConfig()
    fields = {f.name for f in dataclasses.fields(DecodeConfig)}
    try:
        pairs = dict(item.split("=") for item in spec.split(","))
        if not set(pairs) <= fields:
            raise ValueError
        return spec, DecodeConfig(**{k: int(v) for k, v in pairs.items()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: want 'default' or FIELD=N,... with fields {sorted(fields)}")


def config(shape: str) -> dict:
    if shape in SHAPES:
        return {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-5, **SHAPES[shape]}
    return json.loads(Path(shape).read_text())


def random_model(shape: str, tp: int = 1, dtype: str = "bfloat16", memory_fraction: float = 0.9,
                 kv_cache_dtype: str = "auto", **ops):
    """A Model of `shape` with random weights made on device, and a memory plan sizing its KV
    pool as jaxtp.load would."""
    from jaxtp import memory
    from jaxtp.config import ModelConfig
    from jaxtp.entrypoints.api import DTYPES, Model
    from jaxtp.loading import random_state
    from jaxtp.ops import OpsConfig
    from jaxtp.sharding import make_mesh, validate_tp
    cfg = ModelConfig.from_hf(config(shape))
    mesh = make_mesh(tp=tp)
    validate_tp(cfg, tp)
    graphdef, params = random_state(cfg, mesh, DTYPES[dtype])
    cache_dtype = KV_CACHE_DTYPES[kv_cache_dtype]
    plan = memory.plan(cfg, tp, cache_dtype or DTYPES[dtype], 0, memory_fraction, mesh)  # params already in use
    return Model(cfg, mesh, None, graphdef, params, DTYPES[dtype], Path("random"), memory=plan,
                 ops=OpsConfig.resolve(mesh, **ops), kv_cache_dtype=cache_dtype)


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def queued_ms(dispatch, reps: int) -> float:
    """Median ms between the ends of consecutive chunks when each is dispatched before the one
    ahead of it is waited for: the device runs them back to back and the host's dispatch work
    overlaps, as in the engine, which keeps one chunk queued. dispatch() -> the chunk's tokens."""
    ends = []
    out = dispatch()
    for _ in range(reps + 1):
        nxt = dispatch()
        out.block_until_ready()
        ends.append(time.perf_counter())
        out = nxt
    out.block_until_ready()
    ends.append(time.perf_counter())
    return statistics.median((b - a) * 1e3 for a, b in zip(ends[1:], ends[2:]))


def engine_step_ms(model, prompts: list, tokens: int) -> float:
    """ms per token of every row in the Engine's loop (Engine.step, as jaxtp.generate drives it:
    16-step chunks, one queued ahead), from the first tokens (one prefill for all rows) to the
    last; the second of two runs (the first compiles)."""
    from jaxtp import engine
    from jaxtp.engine.runner import bucket
    from jaxtp.engine.sampling import SamplingParams
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for _ in range(2):
        eng = engine.Engine(model, len(prompts), len(prompts[0]) + tokens,
                            max_num_batched_tokens=len(prompts) * bucket(len(prompts[0]), 16))
        for p in prompts:
            eng.add(engine.Sequence(list(p), params, 0))
        eng.step()  # the prefill: every row's first token (the first chunk is queued already)
        t0 = time.perf_counter()
        while eng.has_unfinished:
            eng.step()
        elapsed = time.perf_counter() - t0
    return elapsed * 1e3 / (tokens - 1)


def weight_bytes(params) -> int:
    """Bytes of weights one device holds (and a decode step reads)."""
    import jax
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(params))


def kv_bytes_per_token(model) -> int:
    """Bytes of keys and values one device holds per token, all layers."""
    import jax.numpy as jnp
    cfg = model.config
    return 2 * cfg.num_layers * (model.kv_heads // model.tp) * cfg.head_dim * jnp.dtype(model.cache_dtype).itemsize


def memory_bandwidth(device, mib: int = 2048) -> dict:
    """Measured HBM bandwidth in bytes/s over `mib` MiB (default 2 GiB): `copy` (read + write, an elementwise pass)
    and `read` (a full reduction). Ten launches are queued per timing, so launch gaps vanish."""
    import jax
    import jax.numpy as jnp
    x = jax.device_put(jax.random.normal(jax.random.key(0), (mib << 19,), jnp.bfloat16), device)
    out = {}
    for kind, fn, traffic in [("copy", lambda x: x * 2, 2 * x.nbytes),
                              ("read", lambda x: jnp.sum(x, dtype=jnp.float32), x.nbytes)]:
        f = jax.jit(fn)
        f(x).block_until_ready()

        def ten():
            for _ in range(10):
                y = f(x)
            y.block_until_ready()
        out[kind] = 10 * traffic / (median_ms(ten, 5) / 1e3)
    return out


def with_roofline(r: dict, bandwidth: float) -> dict:
    """r with its roofline at `bandwidth` bytes/s: the step's bytes per GPU / bandwidth."""
    r["bandwidth_tb_per_s"] = bandwidth / 1e12
    r["roofline_ms"] = (r["weight_gb_per_device"] + r["kv_gb_per_device"]) * 1e9 / bandwidth * 1e3
    r["roofline"] = r["roofline_ms"] / r["ms_per_step"]
    return r


def traced(where: Path, run, lowered, steps: int) -> None:
    """Profile one run() into `where` and print its per-kernel summary over `steps` steps, each
    fusion described from the compiled HLO of `lowered` (saved beside the trace)."""
    import jax
    import trace_summary
    with jax.profiler.trace(str(where)):
        run()
    hlo = lowered.compile().as_text()
    (where / "program.hlo.txt").write_text(hlo)
    trace_summary.summarize(where, steps, hlo=hlo)


def run_one(cfg, tp: int, batch: int, args, all_reduce: str = "auto",
            kernels: str = "auto", decode=decode_config("default")) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding

    from jaxtp.engine import kv_cache, runner
    from jaxtp.engine.sampling import SamplingParams
    from jaxtp.entrypoints.api import DTYPES, Model
    from jaxtp.loading import random_state
    from jaxtp.ops import OpsConfig
    from jaxtp.sharding import REPLICATED, make_mesh, validate_tp

    dtype = DTYPES[args.dtype]
    mesh = make_mesh(tp=tp)
    validate_tp(cfg, tp)
    ops = OpsConfig.resolve(mesh, all_reduce, kernels, decode[1])
    mode, kmode = ops.all_reduce, ops.kernels + ("" if decode[0] == "default" else f"[{decode[0]}]")
    graphdef, params = random_state(cfg, mesh, dtype)
    if args.quantization:
        quant.KERNEL = not args.no_quant_kernel
        from jaxtp import quantize
        graphdef, params = quantize.quantize(graphdef, params, mesh, args.quantization)
    model = Model(cfg, mesh, None, graphdef, params, dtype, Path("random"), ops=ops,
                  kv_cache_dtype=KV_CACHE_DTYPES[args.kv_cache_dtype])
    step_args = model.step_args  # what the engine passes its jitted steps

    ctx, steps, size = args.ctx, args.steps, args.page_size
    width = -(-(ctx + steps) // size)  # pages per row
    table = 1 + np.arange(batch, dtype=np.int32)[:, None] * width + np.arange(width, dtype=np.int32)[None]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (batch, ctx)).astype(np.int32)
    sp = [SamplingParams(max_tokens=10**6, temperature=0.0, ignore_eos=True)] * batch
    rows = runner.Rows.build(sp, [0] * batch, [[]] * batch)
    put = lambda x: jax.device_put(x, NamedSharding(mesh, REPLICATED))  # noqa: E731
    prompts = put(runner.PrefillBatch.whole_prompts(tokens, table))
    rows, table, live = put(rows), put(table), put(np.arange(batch, dtype=np.int32))
    new_cache = lambda: kv_cache.init(cfg.num_layers, batch * width + 1, model.kv_heads, size,  # noqa
                                      cfg.head_dim, model.cache_dtype, mesh)
    idle = lambda: put(runner.DecodeState.idle(batch, model.padded_vocab))  # noqa: E731

    def do_prefill(cache, state):  # prompts into every cache slot, as the engine does
        _, _, state, cache = runner.prefill(*step_args, cache, state, rows, prompts, runner.StepConfig(ops))
        return state, cache

    t0 = time.perf_counter()
    state, cache = do_prefill(new_cache(), idle())
    jax.block_until_ready(cache)
    prefill_compile_s = time.perf_counter() - t0
    print(f"  tp={tp} batch={batch}: prefill compiled+ran in {prefill_compile_s:.1f}s", flush=True)
    prefill_ms = None
    holder = [cache]
    if not args.no_prefill:
        def timed_prefill():  # the cache is donated and handed back: one cache in memory
            nonlocal state
            state, holder[0] = do_prefill(holder[0], state)
            jax.block_until_ready(holder[0])
        prefill_ms = median_ms(timed_prefill, args.reps)
        if args.trace:  # one prefill call of batch x ctx tokens, kernel by kernel
            traced(Path(args.trace) / f"prefill_tp{tp}_b{batch}_{mode}_{kmode}", timed_prefill,
                   runner.prefill.lower(*step_args, holder[0], state, rows, prompts, runner.StepConfig(ops)), 1)

    copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))  # one dispatch, not one per array
    first = copy(state)  # decode donates its state: time every chunk from here

    static = runner.StepConfig(ops, steps=steps)  # the decode program timed

    def do_decode(cache):
        out, _, cache = runner.decode(*step_args, cache, copy(first), rows, table, live, static)
        return out.tokens, cache

    t0 = time.perf_counter()
    out, holder[0] = do_decode(holder[0])
    jax.block_until_ready(out)
    decode_compile_s = time.perf_counter() - t0
    digest = hashlib.sha256(np.asarray(out).tobytes()).hexdigest()[:12]  # greedy tokens of one chunk
    print(f"  tp={tp} batch={batch} all_reduce={mode} kernels={kmode}: decode compiled+ran in {decode_compile_s:.1f}s", flush=True)

    def dispatch():  # one chunk on the cache the last one handed back
        out, holder[0] = do_decode(holder[0])
        return out

    def timed():
        dispatch().block_until_ready()

    step_ms = (median_ms(timed, args.reps) if args.chunks == "sync" else queued_ms(dispatch, args.reps)) / steps
    if args.trace:
        traced(Path(args.trace) / f"tp{tp}_b{batch}_{mode}_{kmode}", timed,
               runner.decode.lower(*step_args, holder[0], first, rows, table, live, static), steps)
    engine_ms = None
    if args.engine:
        del holder[0], first  # the Engine allocates its own cache
        engine_ms = engine_step_ms(model, rng.integers(0, cfg.vocab_size, (batch, ctx)).tolist(), args.engine)
    kv_live = batch * (ctx + steps / 2) * kv_bytes_per_token(model)
    return dict(shape=args.shape, tp=tp, batch=batch, ctx=ctx, all_reduce=mode, kernels=kmode, tokens=digest,
                ms_per_step=step_ms, chunks=args.chunks, engine_ms_per_step=engine_ms,
                tokens_per_s=batch / step_ms * 1e3,
                prefill_tokens_per_s=None if prefill_ms is None else batch * ctx / prefill_ms * 1e3,
                compile_s=prefill_compile_s + decode_compile_s, weight_gb_per_device=weight_bytes(params) / 1e9,
                kv_gb_per_device=kv_live / 1e9,
                device=str(jax.devices()[0].device_kind), xla_flags=os.environ.get("XLA_FLAGS", ""))


def main(argv=None):
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
    import jax
    from jaxtp.config import ModelConfig

    cfg = ModelConfig.from_hf(config(args.shape))
    bw = memory_bandwidth(jax.devices()[0], args.bandwidth_mib)
    bandwidth = max(bw.values())  # the better of the two: the stricter roofline
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}, measured bandwidth "
          f"copy {bw['copy'] / 1e12:.2f} TB/s, read {bw['read'] / 1e12:.2f} TB/s; jax {jax.__version__}",
          flush=True)
    results = []
    for tp in args.tp:
        for mode in (args.all_reduce if tp > 1 else ["xla"]):
            for kernels, decode in itertools.product(args.kernels, args.decode_kernel):
                for batch in args.batch:
                    r = with_roofline(run_one(cfg, tp, batch, args, mode, kernels, decode), bandwidth)
                    results.append(r)
                    print(json.dumps(r), flush=True)
    # Measured again after the runs (a GPU still settling its clocks reads low at the start): the
    # roofline uses the higher figure, the stricter one.
    bw_end = memory_bandwidth(jax.devices()[0], args.bandwidth_mib)
    print(f"bandwidth at the end: copy {bw_end['copy'] / 1e12:.2f} TB/s, read {bw_end['read'] / 1e12:.2f} TB/s")
    bandwidth = max(bandwidth, *bw_end.values())
    for r in results:
        with_roofline(r, bandwidth)
    base = {(r["batch"], r["kernels"]): r["tokens_per_s"] for r in results if r["tp"] == 1}
    print(f"\n{args.shape} {args.dtype} ctx={args.ctx} on {results[0]['device']} "
          f"(roofline at {bandwidth / 1e12:.2f} TB/s)")
    print(f"{'tp':>3} {'all_reduce':>10} {'kernels':>7} {'batch':>5} {'ms/step':>8} {'tok/s':>9} {'vs tp1':>7} {'prefill tok/s':>13} "
          f"{'roofline':>8} {'compile s':>9}" + (f" {'engine ms/step':>14}" if args.engine else ""))
    for r in results:
        tp1 = base.get((r["batch"], r["kernels"]))
        speedup = r["tokens_per_s"] / tp1 if tp1 else float("nan")
        pre = f"{r['prefill_tokens_per_s']:.0f}" if r["prefill_tokens_per_s"] else "-"
        print(f"{r['tp']:>3} {r['all_reduce']:>10} {r['kernels']:>7} {r['batch']:>5} {r['ms_per_step']:>8.3f} {r['tokens_per_s']:>9.1f} "
              f"{speedup:>6.2f}x {pre:>13} {r['roofline']:>7.0%} {r['compile_s']:>9.1f}"
              + (f" {r['engine_ms_per_step']:>14.3f}" if args.engine else ""))
    for tp, batch in sorted({(r["tp"], r["batch"]) for r in results}):
        digests = {f"{r['all_reduce']}/{r['kernels']}": r["tokens"] for r in results
                   if (r["tp"], r["batch"]) == (tp, batch)}
        if len(digests) > 1:
            same = "identical" if len(set(digests.values())) == 1 else "DIFFERENT"
            print(f"tp={tp} batch={batch}: greedy tokens {same} across modes (all_reduce/kernels) {digests}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
