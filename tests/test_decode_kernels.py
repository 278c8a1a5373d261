"""The Pallas decode attention (jaxtp/kernels/decode_attention.py), run here in Pallas interpret
mode: the kernel against a plain softmax, and models using it against transformers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtp
from jaxtp import decode_ops
from jaxtp.kernels import decode_attention
from jaxtp.sharding import make_mesh
from test_parity import GREEDY, hf_greedy


def softmax_attention(q, k, v, lo, hi):
    scores = jnp.einsum("bkgd,bksd->bkgs", q, k) * q.shape[-1] ** -0.5
    pos = jnp.arange(k.shape[2])
    visible = (pos[None] >= lo[:, None]) & (pos[None] < hi[:, None])
    probs = jax.nn.softmax(jnp.where(visible[:, None, None], scores, -jnp.inf), axis=-1)
    return jnp.einsum("bkgs,bksd->bkgd", probs, v)


@pytest.mark.parametrize("groups,max_len,chunk", [(1, 256, 256), (4, 384, 128), (16, 64, 256)])
def test_kernel_matches_softmax(groups, max_len, chunk):
    kq, kk, kv = jax.random.split(jax.random.key(groups), 3)
    b, kvh, d = 3, 2, 32
    q = jax.random.normal(kq, (b, kvh, groups, d))
    k, v = jax.random.normal(kk, (b, kvh, max_len, d)), jax.random.normal(kv, (b, kvh, max_len, d))
    lo = jnp.array([0, 40, 0])             # row 1: a sliding window starting at 40
    hi = jnp.array([1, 100, max_len])      # one key, a middle length, the whole cache
    got = decode_attention.attend(q, k, v, lo, hi, decode_attention.Config(chunk=chunk))
    np.testing.assert_allclose(got, softmax_attention(q, k, v, lo, hi), rtol=1e-5, atol=1e-5)


def test_kernel_rejects_unsupported_shapes():
    q, cache = jnp.zeros((1, 1, 1, 24)), jnp.zeros((1, 1, 64, 24))
    assert not decode_attention.supported(64, 24)
    with pytest.raises(ValueError, match="unsupported cache length 64 / head_dim 24"):
        decode_attention.attend(q, cache, cache, jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32))


@pytest.mark.parametrize("family,tp", [("llama", 1), ("mistral", 2), ("qwen3", 2), ("qwen2", 4)])
def test_models_with_the_kernel_match_transformers(tmp_path, monkeypatch, family, tp):
    from conftest import make_checkpoint
    ref = make_checkpoint(family, tmp_path, head_dim=16)  # the kernel needs head_dim >= 16
    calls = []
    attend = decode_attention.attend
    monkeypatch.setattr(decode_attention, "attend", lambda *a, **k: calls.append(1) or attend(*a, **k))
    model = jaxtp.load(tmp_path, tp=tp, dtype="float32", kernels="pallas")
    assert model.kernels == "pallas"
    ids = np.random.default_rng(tp).integers(3, 200, size=(2, 24)).tolist()
    prompts = [ids[0][:5], ids[1][:17]]  # mistral's window is 12: the 17-token row slides
    for prompt, out in zip(prompts, jaxtp.generate(model, prompts, GREEDY)):
        assert out.token_ids == hf_greedy(ref, prompt)
    assert calls  # the decode step really ran the kernel


def test_mode_choice_and_errors(checkpoint):
    assert decode_ops.resolve("auto", make_mesh(tp=2)) == "xla"  # CPU: XLA's
    assert decode_ops.resolve("pallas", make_mesh(tp=2)) == "pallas"
    path, _ = checkpoint("llama")
    with pytest.raises(ValueError, match=r"kernels must be one of 'auto', 'xla', 'pallas', got 'triton'"):
        jaxtp.load(path, kernels="triton")
    with pytest.raises(ValueError, match=r"kernels='pallas' needs pipeline_parallel_size = "
                                         r"data_parallel_size = 1 \(got pp=2, dp=1\)"):
        jaxtp.load(path, pp=2, kernels="pallas")


@pytest.mark.parametrize("groups,head_dim,max_len,rows,dtype", [
    (1, 128, 1152, 1, jnp.bfloat16),   # Llama-2-7B (the shape measured on H200s)
    (4, 128, 1024, 8, jnp.bfloat16),   # Llama-3-8B at tp 2: GQA
    (8, 64, 512, 2, jnp.float16),
    (2, 256, 256, 1, jnp.float32)])
def test_kernel_lowers_to_triton_for_cuda(groups, head_dim, max_len, rows, dtype):
    """The GPU path (Pallas -> Triton) lowers for shapes only interpret mode runs here."""
    q = jax.ShapeDtypeStruct((rows, 4, groups, head_dim), dtype)
    cache = jax.ShapeDtypeStruct((rows, 4, max_len, head_dim), dtype)
    ends = jax.ShapeDtypeStruct((rows,), jnp.int32)
    attend = jax.jit(lambda *a: decode_attention.attend(*a, interpret=False))
    lowered = attend.trace(q, cache, cache, ends, ends).lower(lowering_platforms=("cuda",))
    assert "__gpu$xla.gpu.triton" in lowered.as_text()
