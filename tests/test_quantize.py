"""int8 weight-only quantization: per-output-channel symmetric scales, the same model at every
tp and pp, logits close to the unquantized model, answers of the trained default model kept."""
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import jaxtp

DEFAULT = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-arith"
IDS = [[1, 5, 14, 6, 15, 7, 8, 3, 2, 9]]


def _by_name(model):
    return {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(model.params)}


def test_default_model_keeps_its_answers_with_int8_weights():
    f32 = jaxtp.load(DEFAULT, tp=2, dtype="float32")
    q = jaxtp.load(DEFAULT, tp=2, dtype="float32", quantization="int8")
    params = _by_name(q)
    assert params["model.layers.0.self_attn.qkv_proj.weight"].dtype == np.int8
    assert params["model.layers.3.mlp.down_proj.weight"].dtype == np.int8
    assert params["model.embed_tokens.weight"].dtype == np.float32       # embedding / head kept
    assert q.memory.weight_bytes < f32.memory.weight_bytes / 2
    rng = np.random.default_rng(3)
    pairs = rng.integers(0, 1000, size=(100, 2))
    outs = jaxtp.generate(q, [f"{a}+{b}=" for a, b in pairs], jaxtp.SamplingParams(max_tokens=8, temperature=0))
    assert sum(o.text == str(a + b) for o, (a, b) in zip(outs, pairs)) >= 97


def test_scales_are_per_output_channel_absmax(checkpoint):
    path, ref = checkpoint("llama")
    q = _by_name(jaxtp.load(path, tp=2, dtype="float32", quantization="int8"))
    w = ref.model.layers[1].mlp.down_proj.weight.detach().numpy().T          # [in, out]
    scale = np.abs(w).max(axis=0) / 127
    np.testing.assert_allclose(np.asarray(q["model.layers.1.mlp.down_proj.scale"]), scale, rtol=1e-6)
    got = np.asarray(q["model.layers.1.mlp.down_proj.weight"]).astype(np.float32) * scale
    assert np.all(np.abs(got - w) <= scale / 2 * (1 + 1e-5))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_int8_logits_are_the_same_at_every_layout_and_close_to_unquantized(checkpoint, family):
    path, _ = checkpoint(family)
    base = jaxtp.load(path, tp=1, dtype="float32").logits(IDS)
    q = [jaxtp.load(path, dtype="float32", quantization="int8", tp=tp, pp=pp).logits(IDS)
         for tp, pp in ((1, 1), (2, 1), (4, 1), (2, 2))]
    first = q[0]
    for got in q[1:]:
        np.testing.assert_allclose(got, first, rtol=1e-4, atol=1e-4)
    err = np.abs(first - base).max() / np.abs(base).max()
    assert 0 < err < 0.05  # quantized (not a no-op), and close


def test_unknown_quantization_is_refused(checkpoint):
    with pytest.raises(ValueError, match=r"quantization must be None or one of 'int8', got 'int4'"):
        jaxtp.load(checkpoint("llama")[0], quantization="int4")
