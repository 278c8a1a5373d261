"""benchmarks/benchmark.py end to end on the simulated CPU devices, at a tiny shape: the table, the
JSON, and the greedy-token check across all-reduce and decode-kernel modes."""
import json

from helpers import script

benchmark = script("benchmarks/benchmark.py")


def test_benchmark_runs_and_checks_tokens_across_modes(tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main(["--shape", "tiny", "--tp", "1", "2", "--batch", "1", "3", "--ctx", "20", "--steps", "3",
                    "--reps", "1", "--all-reduce", "xla", "shard_map", "--kernels", "xla", "pallas",
                    "--bandwidth-mib", "8", "--json", str(out)])
    results = json.loads(out.read_text())
    assert [(r["tp"], r["all_reduce"], r["kernels"], r["batch"]) for r in results] == [
        (1, "xla", "xla", 1), (1, "xla", "xla", 3), (1, "xla", "pallas", 1), (1, "xla", "pallas", 3),
        (2, "xla", "xla", 1), (2, "xla", "xla", 3), (2, "xla", "pallas", 1), (2, "xla", "pallas", 3),
        (2, "shard_map", "xla", 1), (2, "shard_map", "xla", 3), (2, "shard_map", "pallas", 1),
        (2, "shard_map", "pallas", 3)]
    for r in results:
        assert r["ms_per_step"] > 0 and r["prefill_tokens_per_s"] > 0 and 0 < r["roofline"]
        assert r["weight_gb_per_device"] > 0
    by = {(r["tp"], r["all_reduce"], r["kernels"], r["batch"]): r for r in results}
    assert by[(2, "xla", "xla", 1)]["weight_gb_per_device"] < by[(1, "xla", "xla", 1)]["weight_gb_per_device"]
    printed = capsys.readouterr().out
    for tp, batch in [(1, 1), (1, 3), (2, 1), (2, 3)]:
        assert f"tp={tp} batch={batch}: greedy tokens identical across modes (all_reduce/kernels)" in printed
    assert " tp all_reduce kernels batch  ms/step" in printed


def test_script_flags_offer_every_mode():
    model_options = script("scripts/model_options.py")
    from jaxtp.ops import allreduce, attention
    assert model_options.ALL_REDUCE_MODES == allreduce.MODES
    assert model_options.KERNEL_MODES == attention.MODES


def test_benchmark_times_the_engine_loop_and_sync_chunks(tmp_path):
    out = tmp_path / "bench.json"
    benchmark.main(["--shape", "tiny", "--batch", "2", "--ctx", "20", "--steps", "3", "--reps", "2",
                    "--no-prefill", "--chunks", "sync", "--engine", "6", "--bandwidth-mib", "8", "--json", str(out)])
    (r,) = json.loads(out.read_text())
    assert r["chunks"] == "sync" and r["ms_per_step"] > 0 and r["engine_ms_per_step"] > 0


def test_benchmark_runs_each_decode_kernel_tiling(tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main(["--shape", "tiny", "--batch", "2", "--ctx", "20", "--steps", "3", "--reps", "1",
                    "--kernels", "pallas", "--decode-kernel", "default", "programs=2,min_blocks=1",
                    "--page-size", "16", "--no-prefill", "--bandwidth-mib", "8", "--json", str(out)])
    assert [r["kernels"] for r in json.loads(out.read_text())] == ["pallas", "pallas[programs=2,min_blocks=1]"]
    assert "tp=1 batch=2: greedy tokens identical across modes" in capsys.readouterr().out


def test_kernel_sass_finds_the_triton_ir_and_its_launch_options():
    """benchmarks/kernel_sass.py's half that needs no `triton` package: the decode kernel's
    Triton IR, printed by Pallas, comes out whole and without locations, with the kernel's warps
    and stages (2 and 3 for 8-bit pages at 32 rows)."""
    sass = script("benchmarks/kernel_sass.py")
    args = sass.argparse.Namespace(kernel="decode", rows=32, kv_heads=32, groups=1, head_dim=128, context=1024,
                                   chunk=256, kv_cache_dtype="fp8")
    printed = sass.lower(args)
    ir = sass.triton_ir(printed)
    assert ir.startswith("module {\n  tt.func public @_kernel(") and ir.rstrip().endswith("}")
    assert "loc" not in ir and "[unknown]" not in ir and "tt.dot" in ir and "f8E4M3FN" in ir
    assert sass.launch_options(printed) == {"num_warps": 2, "num_stages": 3}
