"""8-bit KV pages (`kv_cache_dtype="fp8"`, vLLM's option): the pool holds the tokens the bytes
allow, every attention path reads the pages the same way, and log-probabilities stay within the
README's bounds of the model's own cache."""
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jaxtp
from jaxtp import engine
from helpers import drive, make_checkpoint
from jaxtp.ops import paged
from jaxtp.ops.kernels import decode_attention

DEFAULT = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-arith"
MEMORY = 2 ** 30  # a fixed device size, so that plans compare
RNG = np.random.default_rng(0)
PROMPTS = [RNG.integers(3, 200, 100).tolist(), RNG.integers(3, 200, 61).tolist()]


def _engine(model):
    """16-token pages and 32-token chunks: prefill chunks read the pages earlier ones wrote."""
    return engine.Engine(model, max_num_seqs=2, max_model_len=128, chunk=4, max_num_batched_tokens=32,
                         page_size=16)


def _prompt_logprobs(path, kv_cache_dtype):
    """Each prompt position's (log-probability of the next prompt token, top-1 id), teacher-forced."""
    model = jaxtp.load(path, dtype="float32", kv_cache_dtype=kv_cache_dtype, device_memory_bytes=MEMORY)
    params = jaxtp.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    seqs = [engine.Sequence(list(p), params, seed=i) for i, p in enumerate(PROMPTS)]
    drive(_engine(model), seqs)
    return [(lp[0], lp[2][0]) for s in seqs for lp in s.prompt_logprobs[1:]]


@pytest.mark.parametrize("kv_cache_dtype,bound,agree", [("fp8", 0.03, 0.95), ("fp8_e5m2", 0.06, 0.9)])
def test_fp8_pages_stay_close_to_the_models_own_cache(checkpoint, kv_cache_dtype, bound, agree):
    path, _ = checkpoint("llama")
    base, got = _prompt_logprobs(path, "auto"), _prompt_logprobs(path, kv_cache_dtype)
    error = np.abs(np.array([g[0] for g in got]) - np.array([b[0] for b in base]))
    assert 0 < error.max() < bound  # quantized (not a no-op), and close
    assert np.mean([g[1] == b[1] for g, b in zip(got, base)]) >= agree


def test_fp8_pages_hold_four_times_the_float32_tokens(checkpoint):
    path, _ = checkpoint("llama")
    f32 = jaxtp.load(path, dtype="float32", device_memory_bytes=MEMORY)
    fp8 = jaxtp.load(path, dtype="float32", kv_cache_dtype="fp8", device_memory_bytes=MEMORY)
    assert fp8.memory.kv_bytes_per_token * 4 == f32.memory.kv_bytes_per_token
    assert fp8.memory.max_kv_tokens // 4 == f32.memory.max_kv_tokens
    assert _engine(fp8).runner.cache.k[0].dtype == np.dtype("float8_e4m3fn")


def test_fp8_pages_give_the_same_tokens_at_every_tp_and_kernel(tmp_path, monkeypatch):
    """The Pallas kernels (interpret mode here) round the new key and value through the pages as
    XLA's path does, and tp splits the pages on heads."""
    make_checkpoint("llama", tmp_path, head_dim=32)  # the kernels need head_dim >= 32
    calls = []
    attend = decode_attention.attend
    monkeypatch.setattr(decode_attention, "attend", lambda *a, **k: calls.append(1) or attend(*a, **k))
    params = jaxtp.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)

    def run(**kw):
        model = jaxtp.load(tmp_path, dtype="float32", kv_cache_dtype="fp8", device_memory_bytes=MEMORY, **kw)
        seqs = [engine.Sequence(list(p), params, seed=i) for i, p in enumerate(PROMPTS)]
        return drive(_engine(model), seqs), [lp[0] for s in seqs for lp in s.logprobs]
    want, want_lp = run(tp=1, kernels="xla")
    for tp, kernels in ((2, "xla"), (1, "pallas")):
        got, got_lp = run(tp=tp, kernels=kernels)
        assert got == want
        np.testing.assert_allclose(got_lp, want_lp, rtol=0, atol=1e-5)
    assert calls  # the decode kernel ran


def test_an_unknown_kv_cache_dtype_is_named(checkpoint):
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of 'auto', 'fp8', 'fp8_e4m3', 'fp8_e5m2', "
                                         r"got 'int4'"):
        jaxtp.load(checkpoint("llama")[0], kv_cache_dtype="int4")


def test_the_default_model_keeps_its_answers_with_fp8_pages():
    model = jaxtp.load(DEFAULT, kv_cache_dtype="fp8")
    pairs = np.random.default_rng(3).integers(0, 1000, size=(100, 2))
    outs = jaxtp.generate(model, [f"{a}+{b}=" for a, b in pairs], jaxtp.SamplingParams(max_tokens=8, temperature=0))
    assert sum(o.text == str(a + b) for o, (a, b) in zip(outs, pairs)) >= 97


def test_keys_beyond_e4m3s_range_saturate_in_every_path():
    """XLA's convert makes NaN of what e4m3 cannot hold; pages saturate at 448 instead, in the
    XLA writes and in the decode kernel's, as vLLM's and Triton's conversions do."""
    pages = jnp.zeros((2, 1, 16, 32), jnp.float8_e4m3fn)
    table, pos = jnp.array([[1]]), jnp.array([3])
    big = jnp.full((1, 1, 1, 32), 1000.0).at[..., 0].set(-1e4)
    written = paged.write(pages, big, table, pos[:, None])[1, 0, 3].astype(jnp.float32)
    np.testing.assert_array_equal(written, np.r_[-448.0, [448.0] * 31])
    qkv = jnp.concatenate([jnp.ones((1, 1, 32)), big[0], big[0]], axis=1)  # q | k | v of one head
    cos, sin = jnp.ones((1, 32)), jnp.zeros((1, 32))  # no rotation
    out, k_pages, v_pages, _ = decode_attention.attend(qkv, cos, sin, pages, pages.swapaxes(2, 3), table, pos,
                                                       jnp.array([0]), 1)
    np.testing.assert_array_equal(k_pages[1, 0, 3].astype(jnp.float32), written)
    np.testing.assert_array_equal(v_pages[1, 0, :, 3].astype(jnp.float32), written)
    assert np.isfinite(np.asarray(out, np.float32)).all()
