"""8-bit weights (int8, fp8 e4m3) and fp8 activations: per-output-channel symmetric scales, the
same model at every tp and pp, logits close to the unquantized model (within the README's
bounds), answers of the trained default model kept."""
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxtp
from helpers import fp8_checkpoint, int4_checkpoint
from jaxtp.ops import quant
from jaxtp.ops.kernels import quant_matmul

DEFAULT = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-arith"
IDS = [[1, 5, 14, 6, 15, 7, 8, 3, 2, 9]]
IDS_24 = [(IDS[0] * 3)[:24]]  # 24 rows: within the decode kernel's (ops.quant.KERNEL_ROWS)


def _by_name(model):
    return {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(model.params)}


METHODS = [("int8", np.int8, 0.02), ("fp8_weight_only", jnp.float8_e4m3fn, 0.08), ("fp8", jnp.float8_e4m3fn, 0.1)]


@pytest.mark.parametrize("method,dtype,_", METHODS)
def test_default_model_keeps_its_answers_with_8_bit_weights(method, dtype, _):
    f32 = jaxtp.load(DEFAULT, tp=2, dtype="float32")
    q = jaxtp.load(DEFAULT, tp=2, dtype="float32", quantization=method)
    params = _by_name(q)
    assert params["model.layers.0.self_attn.qkv_proj.weight_t"].dtype == dtype
    assert "model.layers.0.self_attn.qkv_proj.weight" not in params      # one copy, stored [out, in]
    assert params[f"model.layers.3.mlp.down_proj.{'weight_t' if method == 'fp8' else 'weight'}"].dtype == dtype
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
    mlp = ref.model.layers[1].mlp
    for name, hf, part in (("down_proj", mlp.down_proj, ()), ("gate_up_proj", mlp.up_proj, (1,))):
        w, key = hf.weight.detach().numpy(), f"model.layers.1.mlp.{name}"   # [out, in]
        # q|k|v and gate|up are stored [out, in]; o and down too under W8A8 only
        assert (key + ".weight_t" in q) == (name == "gate_up_proj" or method == "fp8")
        got = np.asarray(q[key + ".weight_t"] if key + ".weight_t" in q else q[key + ".weight"].T)[part]
        scale = np.asarray(q[key + ".scale"])[part]
        np.testing.assert_allclose(scale, np.abs(w).max(axis=1) / (127 if method == "int8" else 448), rtol=1e-6)
        got = got.astype(np.float32) * scale[:, None]
        # int8: half a step; e4m3: 3 mantissa bits (2^-4 of the value), subnormals 2^-9 of the scale
        bound = scale[:, None] / 2 if method == "int8" else np.abs(w) * 2 ** -4 + scale[:, None] * 2 ** -9
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


COMPRESSED = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"],
                                            "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                                        "symmetric": True, "dynamic": False},
                                            "input_activations": {"num_bits": 8, "type": "float",
                                                                  "strategy": "token", "dynamic": True}}}}


@pytest.mark.parametrize("tp", [1, 2])
def test_a_prequantized_fp8_checkpoint_loads_as_quantizing_at_load_does(checkpoint, tmp_path, tp):
    """compressed-tensors float8 with per-channel scales and dynamic per-token activations (as
    llm-compressor writes it): the same weights, scales and logits as quantization="fp8" at load."""
    path, _ = checkpoint("llama")
    fp8 = fp8_checkpoint(path, tmp_path / "fp8", "channel", COMPRESSED)
    pre = jaxtp.load(fp8, tp=tp, dtype="float32")
    at_load = jaxtp.load(path, tp=tp, dtype="float32", quantization="fp8")
    a, b = _by_name(pre), _by_name(at_load)
    name = "model.layers.1.self_attn.qkv_proj"
    assert a[name + ".weight_t"].dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(a[name + ".weight_t"], np.float32), np.asarray(b[name + ".weight_t"], np.float32))
    np.testing.assert_allclose(a[name + ".scale"], b[name + ".scale"], rtol=1e-6)
    np.testing.assert_allclose(pre.logits(IDS), at_load.logits(IDS), rtol=1e-5, atol=1e-5)


def test_a_per_tensor_fp8_checkpoint_loads_close_to_the_original(checkpoint, tmp_path):
    """quant_method "fp8" (one scale per tensor, dynamic activations: vLLM's fp8 checkpoints):
    read dequantized, quantized again per channel; logits within fp8's bound of the original."""
    path, _ = checkpoint("llama")
    fp8 = fp8_checkpoint(path, tmp_path / "fp8", "tensor", {"quant_method": "fp8", "activation_scheme": "dynamic"})
    base = jaxtp.load(path, dtype="float32").logits(IDS)
    got = jaxtp.load(fp8, dtype="float32").logits(IDS)
    assert 0 < np.abs(got - base).max() / np.abs(base).max() < 0.1


@pytest.mark.parametrize("config,message", [
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise scales"),
    ({"quant_method": "fp8", "activation_scheme": "static"}, "activation_scheme 'static' is not supported"),
    ({"quant_method": "awq", "bits": 8}, "awq checkpoints with bits=8 are not supported"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "awq version 'gemv'"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ({"quant_method": "bitsandbytes"}, "checkpoint quantization 'bitsandbytes' is not supported"),
])
def test_unsupported_checkpoint_quantization_is_named(checkpoint, tmp_path, config, message):
    fp8 = fp8_checkpoint(checkpoint("llama")[0], tmp_path / "q", "tensor", config)
    with pytest.raises(ValueError, match=message):
        jaxtp.load(fp8, dtype="float32")


@pytest.mark.parametrize("kind,act_order", [("awq", False), ("gptq", False), ("gptq", True)])
def test_a_4_bit_checkpoint_loads_as_the_weights_it_stands_for(checkpoint, tmp_path, kind, act_order):
    """AWQ / GPTQ packing (act_order: groups of shuffled inputs, by g_idx) read back into the
    weights it encodes: the 8-bit model of those dense weights quantized at load, at tp 1 and 2
    and pp 2; logits within int8's bound of transformers' on the dense weights."""
    import torch
    from transformers import AutoModelForCausalLM
    packed, dense = int4_checkpoint(checkpoint("llama")[0], tmp_path, kind, act_order=act_order)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(dense).eval()(torch.tensor(IDS)).logits.numpy()
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        got = jaxtp.load(packed, tp=tp, pp=pp, dtype="float32")
        assert _by_name(got)["model.layers.0.mlp.down_proj.weight"].dtype == np.int8
        at_load = jaxtp.load(dense, tp=tp, pp=pp, dtype="float32", quantization="int8").logits(IDS)
        np.testing.assert_array_equal(got.logits(IDS), at_load)
    assert 0 < np.abs(at_load - want).max() / np.abs(want).max() < 0.02
    fp8 = jaxtp.load(packed, dtype="float32", quantization="fp8_weight_only")  # any 8-bit method
    assert _by_name(fp8)["model.layers.0.mlp.down_proj.weight"].dtype == jnp.float8_e4m3fn


def test_a_4_bit_checkpoint_with_a_part_of_the_wrong_shape_is_named(checkpoint, tmp_path):
    from safetensors.torch import load_file as load_torch, save_file as save_torch
    packed, _ = int4_checkpoint(checkpoint("llama")[0], tmp_path, "awq")
    (file,) = packed.glob("*.safetensors")
    tensors = load_torch(str(file))
    tensors["model.layers.1.mlp.up_proj.scales"] = tensors["model.layers.1.mlp.up_proj.scales"][:1].contiguous()
    save_torch(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.scales' .* has shape \(1, 128\), but "
                                         r"config.json and the awq layout \(group_size 32\) imply \(2, 128\)"):
        jaxtp.load(packed, dtype="float32")


def test_a_prequantized_checkpoint_refuses_another_quantization(checkpoint, tmp_path):
    fp8 = fp8_checkpoint(checkpoint("llama")[0], tmp_path / "fp8", "channel", COMPRESSED)
    with pytest.raises(ValueError, match="holds fp8 weights; quantization='int8' cannot be applied"):
        jaxtp.load(fp8, dtype="float32", quantization="int8")


def _partials_in_xla(x, weight_t, splits, config):
    """The kernel's contract (float32 [splits, N, rows], each split over its share of K) in XLA:
    Mosaic GPU kernels have no interpret mode, so the CPU checks what surrounds the kernel, and
    benchmarks/quant_matmul.py checks the kernel itself on a GPU."""
    xs = x.astype(jnp.float32).reshape(x.shape[0], splits, -1)
    ws = weight_t.astype(jnp.float32).reshape(weight_t.shape[0], splits, -1)
    return jnp.einsum("rsk,nsk->snr", xs, ws)


@pytest.mark.parametrize("weight_dtype", [jnp.int8, jnp.float8_e4m3fn])
@pytest.mark.parametrize("m,k,n", [(1, 512, 256), (7, 1280, 384), (33, 768, 128)])
def test_the_8_bit_decode_product_pads_splits_and_scales_as_float32_does(monkeypatch, weight_dtype, m, k, n):
    """Rows padded to a WGMMA width (8, then powers of two), K split evenly within the program
    budget, partials summed, transposed and scaled; fp8 weights take f16 activations."""
    seen = []
    monkeypatch.setattr(quant_matmul, "_partials", lambda *a: seen.append((a[0].shape, a[0].dtype, a[2])) or _partials_in_xla(*a))
    rng = np.random.default_rng(m)
    w = rng.normal(size=(n, k)) * 40
    w = jnp.asarray(np.clip(np.round(w), -127, 127) if weight_dtype == jnp.int8 else w / 40, weight_dtype)
    scale = jnp.asarray(rng.uniform(1e-3, 1e-2, n), jnp.float32)
    config = quant_matmul.Config(programs=8)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    got = quant_matmul.matmul(x, w, scale, jnp.float32, config=config)
    x_in = x.astype(jnp.float16 if weight_dtype == jnp.float8_e4m3fn else jnp.bfloat16)
    want = np.asarray(x_in, np.float64) @ np.asarray(w, np.float64).T * np.asarray(scale)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    (shape, dtype, splits), = seen
    assert shape == (max(8, 1 << (m - 1).bit_length()), k) and dtype == x_in.dtype
    assert splits == quant_matmul.splits_for(n, k, config) and (n // 64) * splits <= 8 and (k // 128) % splits == 0
    assert quant_matmul.splits_for(384, 1280, config) == 1 and quant_matmul.splits_for(128, 512, config) == 4
    assert not quant_matmul.supported(quant_matmul.MAX_ROWS + 1, n, k) and not quant_matmul.supported(1, n, 48)
    assert quant_matmul.block_k_for(64) == 64 and quant_matmul.supported(1, n, 64) and not quant_matmul.supported(1, 96, k)


@pytest.mark.parametrize("method", ["int8", "fp8_weight_only"])
def test_decode_products_in_the_kernel_give_xla_logits(checkpoint, monkeypatch, method):
    """bf16 (the kernel's activations): the logits of XLA's products within bf16's rounding."""
    path, _ = checkpoint("llama_tied")  # q|k|v 192 wide: a multiple of the kernel's 64 rows
    want = jaxtp.load(path, tp=1, dtype="bfloat16", quantization=method, kernels="xla").logits(IDS_24)
    calls = []
    monkeypatch.setattr(quant, "KERNEL", True)
    monkeypatch.setattr(quant, "_hopper", lambda: True)
    monkeypatch.setattr(quant_matmul, "_partials", lambda *a: calls.append(a[1].shape) or _partials_in_xla(*a))
    model = jaxtp.load(path, tp=1, dtype="bfloat16", quantization=method, kernels="pallas")
    got = model.logits(IDS_24)
    assert np.abs(got - want).max() < 2e-2 * np.abs(want).max()
    assert [w[0] for w in calls] == [192, 256]  # q|k|v and gate|up, traced once for both layers (run_layer)
    model.logits(IDS)  # 10 rows: XLA's product, faster there
    assert len(calls) == 2


def test_decode_sized_w8a8_products_take_the_weight_only_product(monkeypatch):
    """Where quant.weight_only says so (decode-sized rows on a GPU), a W8A8 product is the
    weight-only one: the activations are not quantized; a prefill-sized one still quantizes them."""
    from jaxtp.model import matmul, quantize_rows
    monkeypatch.setattr(quant, "weight_only", quant.bandwidth_bound)
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32).astype(jnp.float8_e4m3fn)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, 32), jnp.float32)
    for rows, weight_only in ((4, True), (quant_matmul.MAX_ROWS + 1, False)):
        x = jnp.asarray(rng.normal(size=(rows, 1, 64)), jnp.float32)
        got = matmul("...i,io->...o", x, w, scale, w8a8=True)
        xq, x_scale = quantize_rows(x, w.dtype) if not weight_only else (x, 1.0)
        want = jnp.einsum("...i,io->...o", xq.astype(jnp.float32), w.astype(jnp.float32)) * scale * x_scale
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
