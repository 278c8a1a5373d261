"""jaxtp against transformers on the same weights: logits (float32) and greedy tokens, every
family, tp = 1, 2, 4, 8 (KV heads are replicated where tp exceeds them)."""
import numpy as np
import pytest
import torch

import jaxtp
from helpers import FAMILIES, GREEDY, hf_greedy


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_greedy_match_transformers(checkpoint, family, tp):
    path, ref = checkpoint(family)
    model = jaxtp.load(path, tp=tp, dtype="float32")
    if tp > ref.config.num_key_value_heads:
        assert model.kv_heads == tp  # replicated KV heads

    rng = np.random.default_rng(tp)
    ids = rng.integers(3, 200, size=(2, 24)).tolist()
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    got = model.logits(ids)
    assert got.shape == want.shape
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4

    prompts = [ids[0][:5], ids[1][:17]]  # ragged batch, generated together
    outs = jaxtp.generate(model, prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(ref, prompt)
        assert out.finish_reason == "length"


def test_stop_token_ends_generation_like_transformers(checkpoint):
    path, ref = checkpoint("llama")
    prompt = [5, 17, 33, 4]
    free = hf_greedy(ref, prompt, 12)
    stop = free[6]
    cut = free.index(stop) + 1
    with torch.no_grad():
        hf = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                          eos_token_id=stop, pad_token_id=0)[0, len(prompt):].tolist()
    model = jaxtp.load(path, tp=2, dtype="float32")
    out = jaxtp.generate(model, [prompt], jaxtp.SamplingParams(
        max_tokens=12, temperature=0.0, stop_token_ids=[stop]))[0]
    assert out.token_ids == hf == free[:cut]
    assert out.finish_reason == "stop"


def test_bfloat16_stays_close_to_float32(checkpoint):
    path, ref = checkpoint("qwen3")
    ids = [[7, 8, 9, 10, 11, 12, 13, 14]]
    f32 = jaxtp.load(path, tp=2, dtype="float32").logits(ids)
    bf16 = jaxtp.load(path, tp=2, dtype="bfloat16").logits(ids)
    assert np.abs(bf16 - f32).max() / np.abs(f32).max() < 5e-2
    assert (bf16.argmax(-1) == f32.argmax(-1)).mean() >= 0.75
