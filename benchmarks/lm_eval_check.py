"""lm-evaluation-harness against the server: a small multiple-choice task (sums, written here)
scored by `lm_eval run --model local-completions` (loglikelihoods from echoed prompt logprobs)
must reach the accuracy that transformers' own log-probabilities give on the same weights.

    python benchmarks/lm_eval_check.py [--model checkpoints/tiny-arith] [--lm-eval lm_eval]

Needs lm_eval with its API extras (`pip install "lm_eval[api]"`, any environment: --lm-eval is
the command); the server runs from this checkout. Prints a table; exits 1 if they differ.
"""
import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import server_process

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [(a, b) for a, b in zip(range(3, 900, 37), range(850, 0, -41))]


def task(tmp: Path) -> Path:
    """The task's data (each sum, the right answer and two near misses) and its YAML. Every
    fourth item labels a near miss as the answer, so the accuracy is not simply 1 and each
    item's choice has to agree, not only the total."""
    docs = []
    for i, (a, b) in enumerate(QUESTIONS):
        s = a + b
        choices = [str(s), str(s + 1), str(s + 10)]
        at = i % 3  # the right answer moves between positions
        choices[0], choices[at] = choices[at], choices[0]
        gold = choices.index(str(s + 10)) if i % 4 == 3 else at
        docs.append({"question": f"{a}+{b}=", "choices": choices, "gold": gold})
    (tmp / "sums.json").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp / "sums.yaml").write_text(f"""task: jaxtp_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp / 'sums.json'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""")
    return tmp


def transformers_accuracy(model: str, docs: list[dict]) -> float:
    """The same choices scored by transformers: context and continuation split as lm_eval does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model)
    ref = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    right = 0
    for d in docs:
        ctx = tok(d["question"])["input_ids"]
        scores = []
        for c in d["choices"]:
            ids = tok(d["question"] + c)["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), -1)
            scores.append(sum(lp[j - 1, ids[j]].item() for j in range(len(ctx), len(ids))))
        right += max(range(len(scores)), key=scores.__getitem__) == d["gold"]
    return right / len(docs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "tiny-arith"))
    p.add_argument("--lm-eval", default="lm_eval", help="the lm_eval command")
    p.add_argument("--port", type=int, default=8123)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = task(Path(tmp))
        docs = [json.loads(line) for line in (tmp / "sums.json").read_text().splitlines()]
        proc = server_process.start(args.model, args.port, "--served-model-name", "jaxtp", "--dtype", "float32",
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            run = subprocess.run([args.lm_eval, "run", "--model", "local-completions", "--tasks", "jaxtp_sums",
                                  "--include_path", str(tmp), "--output_path", str(tmp / "out"), "--model_args",
                                  f"model=jaxtp,base_url=http://127.0.0.1:{args.port}/v1/completions,"
                                  f"tokenizer={args.model},tokenized_requests=True,add_bos_token=True,num_concurrent=4"],
                                 capture_output=True, text=True, timeout=900)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        if run.returncode:
            raise SystemExit(f"lm_eval failed:\n{run.stderr[-3000:]}")
        result = json.loads(next((tmp / "out").rglob("results*.json")).read_text())
        served = result["results"]["jaxtp_sums"]["acc,none"]
    want = transformers_accuracy(args.model, docs)
    print(f"{'questions':>9} {'lm_eval acc (server)':>20} {'transformers acc':>16}")
    print(f"{len(docs):>9} {served:>20.4f} {want:>16.4f}")
    raise SystemExit(0 if abs(served - want) < 1e-9 else 1)


if __name__ == "__main__":
    main()
