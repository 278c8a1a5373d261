"""Greedy and logits parity with transformers on real GPUs, with the GPU-only paths on (the
Pallas decode step, the NVLink all-reduce, CUDA graphs): tiny random checkpoints of every
supported family (tests/helpers.py, head_dim 64 so the Pallas kernel runs), float32 with full-
precision matmuls, jaxtp at each --tp against transformers' PyTorch model on the CPU.

    python benchmarks/parity.py --tp 1 2 [4 8]

Prints one row per family and tp; exits 1 if any greedy continuation differs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

# Sized for tp 8: 8 query heads of 64, the families' own KV head counts (replicated past them).
SHAPE = dict(hidden_size=512, head_dim=64, num_attention_heads=8, intermediate_size=1024,
             vocab_size=512, num_hidden_layers=3, max_position_embeddings=512)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args(argv)

    import jax
    import numpy as np
    import torch

    import jaxtp
    from helpers import FAMILIES, make_checkpoint

    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32: compare float32
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, SHAPE["vocab_size"], size=n).tolist() for n in (5, 17, 40)]
    params = jaxtp.SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    print(f"{jax.devices()[0].device_kind} x{len(jax.devices())}, jax {jax.__version__}, "
          f"torch {torch.__version__}", flush=True)
    print(f"{'family':>10} {'tp':>3} {'all_reduce':>10} {'kernels':>7} {'greedy equal':>12} "
          f"{'logits max rel err':>18}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            path = Path(tmp) / family
            ref = make_checkpoint(family, path, **SHAPE)
            with torch.no_grad():
                want = [ref.generate(torch.tensor([q]), max_new_tokens=args.tokens, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, len(q):].tolist()
                        for q in prompts]
                ids = prompts[1]
                want_logits = ref(torch.tensor([ids])).logits[0].numpy()
            for tp in args.tp:
                model = jaxtp.load(path, tp=tp, dtype="float32")
                got = [o.token_ids for o in jaxtp.generate(model, prompts, params)]
                same = sum(g == w for g, w in zip(got, want))
                logits = model.logits([ids])[0]
                err = float(np.max(np.abs(logits - want_logits)) / np.max(np.abs(want_logits)))
                ok &= same == len(prompts)
                print(f"{family:>10} {tp:>3} {model.ops.all_reduce:>10} {model.ops.kernels:>7} "
                      f"{same:>7}/{len(prompts)}    {err:>18.2e}", flush=True)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
