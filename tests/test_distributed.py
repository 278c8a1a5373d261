"""Multi-process runs on loopback: 2 CPU processes (gloo collectives) joined by jax.distributed
give the same greedy tokens as one process, for tp across processes, dp x tp and pp x tp."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import jaxtp
from helpers import free_port, make_checkpoint

WORKER = Path(__file__).with_name("mp_worker.py")
ROOT = WORKER.parent.parent
PROMPTS = [[5, 6, 7], list(range(10, 31)), [42], list(range(50, 59))]
MAX_TOKENS = 8
TIMEOUT = 240


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 4-layer Qwen3 (q/k norm, one KV head): two layers per stage at pp=2."""
    path = tmp_path_factory.mktemp("qwen3_4layers")
    make_checkpoint("qwen3", path, num_hidden_layers=4)
    return path


@pytest.fixture(scope="module")
def single(deep):
    """The single-process greedy tokens (test_parity checks these against transformers)."""
    model = jaxtp.load(deep, tp=1, dtype="float32")
    params = jaxtp.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in jaxtp.generate(model, PROMPTS, params)]


def launch(argv, n: int = 2) -> list[str]:
    """Run `argv + [--coordinator ... --process-id i]` as n processes on loopback; wait for all
    (killing every one on a failure or timeout); return their stdout, checking they succeeded."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen(
        [sys.executable, *map(str, argv), "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
         "--process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=ROOT) for i in range(n)]
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{err[-3000:]}"
    return [out for out, _ in outs]


def run_workers(model, devices: int, tp: int, dp: int = 1, pp: int = 1) -> list[dict]:
    logs = launch([WORKER, model, json.dumps(PROMPTS), "--devices", devices, "--tp", tp, "--dp", dp,
                   "--pp", pp, "--max-tokens", MAX_TOKENS])
    lines = [next((ln for ln in log.splitlines() if ln.startswith("TOKENS ")), None) for log in logs]
    assert all(lines), f"a worker printed no tokens: {logs}"
    return [json.loads(line[len("TOKENS "):]) for line in lines]


@pytest.mark.parametrize("devices,tp,dp,pp", [
    (2, 4, 1, 1),   # one tensor-parallel group spanning both processes
    (4, 4, 2, 1),   # dp x tp: one replica per process, tp within it
    (2, 2, 1, 2),   # pp x tp: one stage per process, hidden states handed across
], ids=["tp4", "dp2xtp4", "pp2xtp2"])
def test_two_processes_match_one(deep, single, devices, tp, dp, pp):
    results = run_workers(deep, devices, tp, dp, pp)
    assert [r["process"] for r in results] == [0, 1]
    assert all(r["devices"] == 2 * devices for r in results)
    for r in results:
        assert r["tokens"] == single
    # Each process reads from disk only the layers its devices hold: its stage's, with pp.
    per_stage = 4 // pp
    assert [r["layers_read"] for r in results] == [
        list(range(s * per_stage, (s + 1) * per_stage)) if pp > 1 else [0, 1, 2, 3] for s in (0, 1)]


def test_cli_across_two_processes():
    """scripts/generate.py on the embedded default model: tp=2 x dp=2 x pp=2 over 2 processes."""
    outs = launch([ROOT / "scripts" / "generate.py", "--tp", 2, "--dp", 2, "--pp", 2,
                   "--prompt", "2+3=", "--prompt", "400+600=", "--prompt", "17+25="])
    assert "'2+3=' -> '5' (stop)" in outs[0] and "'400+600=' -> '1000' (stop)" in outs[0]
    assert "'17+25=' -> '42' (stop)" in outs[0]
    assert "devices=8x cpu" in outs[0] and "dp=2, pp=2, processes=2" in outs[0]
    assert " -> " not in outs[1] and "prompts," not in outs[1]  # only process 0 prints results
