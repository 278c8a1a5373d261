"""The embedded default checkpoint (a tiny Llama trained to add) through the real tokenizer path:
checkable answers, EOS stops, the vLLM-shaped wrapper and the CLI."""
import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import jaxtp

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "checkpoints" / "tiny-arith"


@pytest.fixture(scope="module")
def model():
    return jaxtp.load(DEFAULT, tp=2, dtype="float32")


def test_answers_are_correct_and_stop_on_eos(model):
    rng = np.random.default_rng(7)
    pairs = rng.integers(0, 1000, size=(100, 2))
    prompts = [f"{a}+{b}=" for a, b in pairs]
    outs = jaxtp.generate(model, prompts, jaxtp.SamplingParams(max_tokens=8, temperature=0.0))
    correct = sum(o.text == str(a + b) for o, (a, b) in zip(outs, pairs))
    assert correct >= 97
    assert all(o.finish_reason == "stop" and o.token_ids[-1] == 2 for o in outs)
    assert outs[0].prompt == prompts[0]


def test_text_generation_matches_transformers(model):
    ref = AutoModelForCausalLM.from_pretrained(DEFAULT, dtype=torch.float32).eval()
    tok = model.tokenizer
    for prompt in ["17+305=", "999+999=", "5+5="]:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        want = ref.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
        got = jaxtp.generate(model, [prompt], jaxtp.SamplingParams(max_tokens=8, temperature=0))[0]
        assert got.token_ids == want


def test_llm_wrapper_and_max_tokens():
    llm = jaxtp.LLM(model=str(DEFAULT), tensor_parallel_size=2, dtype="float32")
    outs = llm.generate(["12+30=", "1+1="], jaxtp.SamplingParams(temperature=0.8, top_p=0.95, max_tokens=100,
                                                                 seed=3))
    assert [o.outputs[0].finish_reason for o in outs] == ["stop", "stop"]
    assert all(isinstance(o.outputs[0].text, str) and o.prompt_token_ids[0] == 1 for o in outs)
    cut = llm.generate("123+456=", jaxtp.SamplingParams(temperature=0, max_tokens=2))[0].outputs[0]
    assert cut.text == "57" and cut.finish_reason == "length"


def test_cli_runs_the_default_with_simulated_devices():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--tp", "4",
                          "--prompt", "2+3=", "--prompt", "400+600="], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "'2+3=' -> '5' (stop)" in run.stdout and "'400+600=' -> '1000' (stop)" in run.stdout
    assert "tp=4, devices=4x" in run.stdout


def test_cli_reports_bad_input_without_a_traceback():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--tp", "3"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert run.stderr.strip() == ("error: Total number of attention heads (8) must be divisible by "
                                  "tensor parallel size (3).")


def test_cli_stream_chat_prompts_file_and_sampling_flags(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("17+25=\n\n408+199=\n")
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--prompts-file", str(prompts),
                          "--chat", "--stream", "--stop", "07", "--logprobs", "1", "--repetition-penalty", "1.0"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    deltas = [line[1:].split("] ", 1) for line in run.stdout.splitlines() if line.startswith("[")]  # [i.n] 'text'
    streamed = ["".join(ast.literal_eval(d) for at, d in deltas if at == f"{i}.0") for i in (0, 1)]
    assert streamed == ["42", "6"]  # "607" stops at "07": the "0" was held back, never streamed
    assert "2 prompts" in run.stdout and "tp=1" in run.stdout
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--prompt", "1+1=",
                          "--presence-penalty", "3"], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert run.stderr.strip() == "error: SamplingParams.presence_penalty must be in [-2, 2], got 3.0"
