"""8-bit weights (int8, fp8 e4m3) and fp8 activations: per-output-channel symmetric scales, the
same model at every tp and pp, logits close to the unquantized model (within the README's
bounds), answers of the trained default model kept."""
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxtp

DEFAULT = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-arith"
IDS = [[1, 5, 14, 6, 15, 7, 8, 3, 2, 9]]


def _by_name(model):
    return {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(model.params)}


METHODS = [("int8", np.int8, 0.02), ("fp8_weight_only", jnp.float8_e4m3fn, 0.08), ("fp8", jnp.float8_e4m3fn, 0.1)]


@pytest.mark.parametrize("method,dtype,_", METHODS)
def test_default_model_keeps_its_answers_with_8_bit_weights(method, dtype, _):
    f32 = jaxtp.load(DEFAULT, tp=2, dtype="float32")
    q = jaxtp.load(DEFAULT, tp=2, dtype="float32", quantization=method)
    params = _by_name(q)
    assert params["model.layers.0.self_attn.qkv_proj.weight"].dtype == dtype
    assert params["model.layers.3.mlp.down_proj.weight"].dtype == dtype
    assert params["model.embed_tokens.weight"].dtype == np.float32       # embedding / head kept
    assert q.memory.weight_bytes < f32.memory.weight_bytes / 2
    rng = np.random.default_rng(3)
    pairs = rng.integers(0, 1000, size=(100, 2))
    outs = jaxtp.generate(q, [f"{a}+{b}=" for a, b in pairs], jaxtp.SamplingParams(max_tokens=8, temperature=0))
    assert sum(o.text == str(a + b) for o, (a, b) in zip(outs, pairs)) >= 97


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_scales_are_per_output_channel_absmax(checkpoint, method):
    path, ref = checkpoint("llama")
    q = _by_name(jaxtp.load(path, tp=2, dtype="float32", quantization=method))
    w = ref.model.layers[1].mlp.down_proj.weight.detach().numpy().T          # [in, out]
    scale = np.abs(w).max(axis=0) / (127 if method == "int8" else 448)
    np.testing.assert_allclose(np.asarray(q["model.layers.1.mlp.down_proj.scale"]), scale, rtol=1e-6)
    got = np.asarray(q["model.layers.1.mlp.down_proj.weight"]).astype(np.float32) * scale
    # int8: half a step; e4m3: 3 mantissa bits (2^-4 of the value), subnormals 2^-9 of the scale
    bound = scale / 2 if method == "int8" else np.abs(w) * 2 ** -4 + scale * 2 ** -9
    assert np.all(np.abs(got - w) <= bound * (1 + 1e-5))


@pytest.mark.parametrize("method,_,bound", METHODS)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logits_are_the_same_at_every_layout_and_close_to_unquantized(checkpoint, family, method, _, bound):
    """Max |error| over the max |logit| within the README's bound, top-1 agreeing at >= 90% of
    the positions of random-weight models (whose logits are close together)."""
    path, _ = checkpoint(family)
    base = jaxtp.load(path, tp=1, dtype="float32").logits(IDS)
    q = [jaxtp.load(path, dtype="float32", quantization=method, tp=tp, pp=pp).logits(IDS)
         for tp, pp in ((1, 1), (2, 1), (4, 1), (8, 1), (2, 2))]
    first = q[0]
    for got in q[1:]:
        np.testing.assert_allclose(got, first, rtol=1e-4, atol=1e-4)
    err = np.abs(first - base).max() / np.abs(base).max()
    assert 0 < err < bound  # quantized (not a no-op), and close
    assert np.mean(first.argmax(-1) == base.argmax(-1)) >= 0.9


def test_unknown_quantization_is_refused(checkpoint):
    with pytest.raises(ValueError, match=r"quantization must be None or one of 'int8', 'fp8', 'fp8_weight_only', "
                                         r"got 'int4'"):
        jaxtp.load(checkpoint("llama")[0], quantization="int4")
