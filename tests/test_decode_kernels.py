"""The Pallas decode attention (jaxtp/ops/kernels/decode_attention.py), run here in Pallas interpret
mode: the kernel against a plain softmax, and models using it against transformers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtp
from jaxtp import rope
from jaxtp.ops import OpsConfig, attention
from jaxtp.ops.kernels import decode_attention, prefill_attention
from jaxtp.sharding import make_mesh
from jaxtp import engine
from helpers import GREEDY, drive, hf_greedy, make_checkpoint, script


def reference_step(qkv, cos, sin, k_cache, v_cache, pos, lo, num_heads):
    """The decode step written plainly: rope, cache write, softmax over [lo, pos]."""
    b, kvh, s, d = k_cache.shape
    rows = jnp.arange(b)
    q, k, v = jnp.split(qkv[:b, None], [num_heads, num_heads + kvh], axis=2)
    q, k = rope.apply(q, cos[:, None], sin[:, None]), rope.apply(k, cos[:, None], sin[:, None])
    k_cache, v_cache = k_cache.at[rows, :, pos].set(k[:, 0]), v_cache.at[rows, :, pos].set(v[:, 0])
    scores = jnp.einsum("bkgd,bksd->bkgs", q[:, 0].reshape(b, kvh, -1, d), k_cache) * d ** -0.5
    at = jnp.arange(s)
    visible = (at[None] >= lo[:, None]) & (at[None] <= pos[:, None])
    probs = jax.nn.softmax(jnp.where(visible[:, None, None], scores, -jnp.inf), axis=-1)
    return jnp.einsum("bkgs,bksd->bkgd", probs, v_cache), k_cache, v_cache


_check = script("benchmarks/pallas_check.py")  # its paging helpers
to_pages, from_pages, to_value_pages, from_value_pages = (
    _check.to_pages, _check.from_pages, _check.to_value_pages, _check.from_value_pages)


@pytest.mark.parametrize("groups,max_len,head_dim,page,config", [
    (1, 256, 32, 64, decode_attention.Config()),                    # MHA, several splits
    (4, 384, 64, 64, decode_attention.Config(programs=6)),          # GQA, one split per row and head
    (3, 128, 32, 32, decode_attention.Config(min_blocks=1)),        # 3 query heads: 13 padding rows
    (5, 384, 32, 16, decode_attention.Config(programs=72, min_blocks=1)),  # 12 splits, 5 heads
])
def test_kernel_matches_reference(groups, max_len, head_dim, page, config):
    kvh, b = 2, 3
    num_heads = groups * kvh
    kq, kk, kv = jax.random.split(jax.random.key(groups), 3)
    qkv = jax.random.normal(kq, (b + 1, num_heads + 2 * kvh, head_dim))   # + a padding row
    k_cache = jax.random.normal(kk, (b, kvh, max_len, head_dim))
    v_cache = jax.random.normal(kv, (b, kvh, max_len, head_dim))
    (k_pages, table), (v_pages, _) = to_pages(k_cache, page), to_value_pages(v_cache, page)
    pos = jnp.array([0, 99, max_len - 1])  # the first position, a middle one, the last slot
    lo = jnp.array([0, 40, 0])             # row 1: a sliding window starting at 40
    freq = np.geomspace(1.0, 1e-3, head_dim // 2).astype(np.float32)
    cos, sin = (x[:, 0] for x in rope.cos_sin(pos[:, None], freq, 1.0))
    out, k_got, v_got, counters = decode_attention.attend(qkv, cos, sin, k_pages, v_pages, table, pos, lo,
                                                          num_heads, config=config)
    want = reference_step(qkv, cos, sin, k_cache, v_cache, pos, lo, num_heads)
    assert out.shape == (b + 1, kvh, groups, head_dim)
    np.testing.assert_array_equal(out[b:], 0)  # the padding row comes out zero
    for g, w in zip((out[:b], from_pages(k_got, table), from_value_pages(v_got, table)), want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(k_got[0], 0)  # nothing written to the scratch page
    if decode_attention.splits_for(b, kvh, max_len, page, config) > 1:
        np.testing.assert_array_equal(counters, 0)  # handed back zeroed, ready for the next layer
        again = decode_attention.attend(qkv, cos, sin, k_pages, v_pages, table, pos, lo, num_heads, counters,
                                        config=config)
        np.testing.assert_array_equal(again[0], out)
    else:
        assert counters is None


def test_kernel_sums_split_k_partials():
    """qkv given as the float32 partial sums of a split contraction: the kernel adds them (and
    rounds to the caches' dtype) where XLA's reduction kernel would have."""
    kvh, b, groups, head_dim, max_len = 2, 2, 2, 32, 128
    num_heads = groups * kvh
    kq, kk, kv = jax.random.split(jax.random.key(7), 3)
    parts = jax.random.normal(kq, (4, b + 1, num_heads + 2 * kvh, head_dim))
    k_pages, table = to_pages(jax.random.normal(kk, (b, kvh, max_len, head_dim), jnp.bfloat16), 64)
    v_pages, _ = to_value_pages(jax.random.normal(kv, (b, kvh, max_len, head_dim), jnp.bfloat16), 64)
    pos, lo = jnp.array([5, 77]), jnp.array([0, 0])
    freq = np.geomspace(1.0, 1e-3, head_dim // 2).astype(np.float32)
    cos, sin = (x[:, 0] for x in rope.cos_sin(pos[:, None], freq, 1.0))
    summed = (parts[0] + parts[1] + parts[2] + parts[3]).astype(jnp.bfloat16)  # the kernel's order
    got = decode_attention.attend(parts, cos, sin, k_pages, v_pages, table, pos, lo, num_heads)
    want = decode_attention.attend(summed, cos, sin, k_pages, v_pages, table, pos, lo, num_heads)
    assert got[0].dtype == jnp.bfloat16
    for g, w in zip(got[:3], want[:3]):
        np.testing.assert_array_equal(g, w)
    with pytest.raises(ValueError, match="does not match"):
        decode_attention.attend(parts.astype(jnp.bfloat16), cos, sin, k_pages, v_pages, table, pos, lo, num_heads)


def test_splits_keep_the_grid_busy():
    config = decode_attention.Config()
    assert decode_attention.splits_for(1, 32, 1152, 64, config) == 4    # batch 1: 128 programs
    assert decode_attention.splits_for(8, 32, 1152, 64, config) == 1    # batch 8: 256 already
    wide = decode_attention.Config(programs=512)
    assert decode_attention.splits_for(1, 8, 1000, 16, wide) == 32      # never under min_blocks


def test_kernel_rejects_unsupported_shapes():
    qkv, pages, ends = jnp.zeros((1, 3, 16)), jnp.zeros((2, 1, 64, 16)), jnp.zeros(1, jnp.int32)
    cos, table = jnp.zeros((1, 16)), jnp.ones((1, 1), jnp.int32)
    assert not decode_attention.supported(64, 16) and not decode_attention.supported(48, 32)
    with pytest.raises(ValueError, match="unsupported page size 64 / head_dim 16"):
        decode_attention.attend(qkv, cos, cos, pages, pages, table, ends, ends, 1)
    pages = jnp.zeros((2, 1, 64, 32))
    with pytest.raises(ValueError, match=r"value pages \(2, 1, 64, 32\) float32 are not \(2, 1, 32, 64\)"):
        decode_attention.attend(jnp.zeros((1, 3, 32)), cos, cos, pages, pages, table, ends, ends, 1)
    with pytest.raises(ValueError, match=r"qkv \(1, 3, 32\) does not match 2 query heads"):
        decode_attention.attend(jnp.zeros((1, 3, 32)), cos, cos, pages, pages.swapaxes(2, 3), table, ends, ends, 2)
    pages = pages.astype(jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="partials over 8-bit pages need the activations' dtype"):
        decode_attention.attend(jnp.zeros((4, 1, 3, 32)), cos, cos, pages, pages.swapaxes(2, 3), table, ends, ends, 1)


@pytest.mark.parametrize("family,tp", [("llama", 1), ("mistral", 2), ("qwen3", 2), ("qwen2", 4)])
def test_models_with_the_kernel_match_transformers(tmp_path, monkeypatch, family, tp):
    ref = make_checkpoint(family, tmp_path, head_dim=32)  # the kernel needs head_dim >= 32
    calls = []
    attend = decode_attention.attend
    # 16-token pages, one block each: a tiny sequence gets several splits, so every step merges
    # in the kernel (empty splits included) and the arrival counters pass from layer to layer.
    split = decode_attention.Config(min_blocks=1)
    monkeypatch.setattr(decode_attention, "attend",  # a[-1], the model's tiling, is replaced
                        lambda *a: calls.append(a[0].ndim) or attend(*a[:-1], config=split))
    model = jaxtp.load(tmp_path, tp=tp, dtype="float32", kernels="pallas")
    assert model.ops.kernels == "pallas"
    ids = np.random.default_rng(tp).integers(3, 200, size=(2, 24)).tolist()
    prompts = [ids[0][:5], ids[1][:17]]  # mistral's window is 12: the 17-token row slides
    eng = engine.Engine(model, max_num_seqs=2, max_model_len=128, page_size=16, max_num_batched_tokens=16)
    got = drive(eng, [engine.Sequence(p, GREEDY, 0) for p in prompts])
    for prompt, tokens in zip(prompts, got):
        assert tokens == hf_greedy(ref, prompt)
    assert calls  # the decode step really ran the kernel
    # ... summing qkv's split-K partials itself where the projection has no bias or qk-norm
    assert set(calls) == ({4} if family in ("llama", "mistral") else {3})


def test_mode_choice_and_errors(checkpoint):
    assert attention.resolve("auto", make_mesh(tp=2)) == "xla"  # CPU: XLA's
    assert attention.resolve("pallas", make_mesh(tp=2)) == "pallas"
    path, _ = checkpoint("llama")
    with pytest.raises(ValueError, match=r"kernels must be one of 'auto', 'xla', 'pallas', got 'triton'"):
        jaxtp.load(path, kernels="triton")
    with pytest.raises(ValueError, match=r"kernels='pallas' needs pipeline_parallel_size = "
                                         r"data_parallel_size = 1 \(got pp=2, dp=1\)"):
        jaxtp.load(path, pp=2, kernels="pallas")


@pytest.mark.parametrize("groups,head_dim,max_len,rows,dtype,pages_dtype,warps", [
    (1, 128, 1152, 1, jnp.bfloat16, None, 4),   # Llama-2-7B (the shape measured on H200s)
    (4, 128, 1024, 8, jnp.bfloat16, None, 4),   # Llama-3-8B at tp 2: GQA
    (8, 64, 512, 2, jnp.float16, None, 4),
    (2, 256, 256, 1, jnp.float32, None, 4),
    (1, 128, 1024, 1, jnp.bfloat16, jnp.float8_e4m3fn, 4),    # e4m3 pages, the sequence split
    (1, 128, 1024, 40, jnp.bfloat16, jnp.float8_e4m3fn, 2)])  # ... 160 programs unsplit
def test_kernel_lowers_to_triton_for_cuda(groups, head_dim, max_len, rows, dtype, pages_dtype, warps):
    """The GPU path (Pallas -> Triton) lowers for shapes only interpret mode runs here."""
    kvh = 4
    qkv = jax.ShapeDtypeStruct((rows + 1, (groups + 2) * kvh, head_dim), dtype)
    cos = jax.ShapeDtypeStruct((rows, head_dim), jnp.float32)
    pages = jax.ShapeDtypeStruct((rows * max_len // 64 + 1, kvh, 64, head_dim), pages_dtype or dtype)
    v_pages = jax.ShapeDtypeStruct((rows * max_len // 64 + 1, kvh, head_dim, 64), pages_dtype or dtype)
    table = jax.ShapeDtypeStruct((rows, max_len // 64), jnp.int32)
    ends = jax.ShapeDtypeStruct((rows,), jnp.int32)
    attend = jax.jit(lambda *a: decode_attention.attend(*a, num_heads=groups * kvh, interpret=False))
    lowered = attend.trace(qkv, cos, cos, pages, v_pages, table, ends, ends).lower(lowering_platforms=("cuda",))
    assert "__gpu$xla.gpu.triton" in lowered.as_text()
    assert f"num_warps = {warps} : i32" in lowered.as_text()
    parts = jax.ShapeDtypeStruct((4, *qkv.shape), jnp.float32)  # split-K partials, summed in the kernel
    attend = jax.jit(lambda *a: decode_attention.attend(*a, num_heads=groups * kvh, dtype=dtype, interpret=False))
    assert "__gpu$xla.gpu.triton" in attend.trace(parts, cos, cos, pages, v_pages, table, ends, ends).lower(
        lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("window,pages", [(None, 1), (20, 1), (None, 2)])
def test_prefill_kernel_matches_a_plain_softmax(window, pages):
    """Two chunks of 32 queries, one starting a prompt and one at position 40 (attending to the
    40 earlier positions in shuffled pages and causally to itself)."""
    b, t, kvh, groups, d, size, width = 2, 32, 2, 2, 32, 16, 6
    kq, kk, kv = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(kq, (b, t, kvh * groups, d))
    k_cache = jax.random.normal(kk, (b, kvh, width * size, d))
    v_cache = jax.random.normal(kv, (b, kvh, width * size, d))
    (k_pages, table), (v_pages, _) = to_pages(k_cache, size), to_value_pages(v_cache, size)
    starts = jnp.array([0, 40])
    got = prefill_attention.attend(q, k_pages, v_pages, table, starts, window,
                                   config=prefill_attention.Config(block_q=16, pages=pages))
    q_pos, k_pos = starts[:, None] + jnp.arange(t), jnp.arange(width * size)
    visible = k_pos[None, None] <= q_pos[:, :, None]
    if window is not None:
        visible &= k_pos[None, None] > q_pos[:, :, None] - window
    scores = jnp.einsum("bthd,bhsd->bhts", q, jnp.repeat(k_cache, groups, axis=1)) * d ** -0.5
    probs = jax.nn.softmax(jnp.where(visible[:, None], scores, -jnp.inf), axis=-1)
    want = jnp.einsum("bhts,bhsd->bthd", probs, jnp.repeat(v_cache, groups, axis=1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_prefill_kernel_lowers_to_triton_for_cuda():
    q = jax.ShapeDtypeStruct((1, 256, 32, 128), jnp.bfloat16)
    pages = jax.ShapeDtypeStruct((65, 8, 64, 128), jnp.bfloat16)
    v_pages = jax.ShapeDtypeStruct((65, 8, 128, 64), jnp.bfloat16)
    table, starts = jax.ShapeDtypeStruct((1, 64), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)
    attend = jax.jit(lambda *a: prefill_attention.attend(*a, interpret=False))
    assert "__gpu$xla.gpu.triton" in attend.trace(q, pages, v_pages, table, starts).lower(
        lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_bfloat16_rows_read_fp8_pages_as_xlas_path_does(heads, kv_heads):
    """The GPU's case: bf16 activations with e4m3 pages (the loop's dots then take float16)."""
    assert _check.check("fp8 pages", 3, heads, kv_heads, repeats=1, max_len=320, d=64,
                        cache_dtype=jnp.float8_e4m3fn)


def test_queries_beyond_float16s_range_stay_finite_on_fp8_pages():
    b, heads, d, max_len = 2, 4, 64, 128
    qkv = jax.random.normal(jax.random.key(0), (b, 3 * heads, d), jnp.bfloat16).at[:, :heads].multiply(3e5)
    cache = jax.random.normal(jax.random.key(1), (b, heads, max_len, d)).astype(jnp.float8_e4m3fn)
    (k_pages, table), (v_pages, _) = to_pages(cache, 64), to_value_pages(cache, 64)
    pos = jnp.array([5, max_len - 1])
    cos, sin = (x[:, 0] for x in rope.cos_sin(pos[:, None], np.ones(d // 2, np.float32), 1.0))
    out = decode_attention.attend(qkv, cos, sin, k_pages, v_pages, table, pos, jnp.zeros_like(pos), heads)[0]
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


def test_the_models_ops_config_picks_the_decode_tiling(monkeypatch):
    tiling = decode_attention.Config(programs=3, warps=2)
    ops = OpsConfig.resolve(make_mesh(tp=1), "xla", "pallas", tiling)
    seen = []
    monkeypatch.setattr(decode_attention, "attend", lambda *a: seen.append(a[-1]) or (a[0][:, :1], *a[3:5], a[9]))
    pages = jnp.zeros((2, 1, 16, 32))
    attention.decode(ops, jnp.zeros((1, 1, 1, 3, 32)), jnp.zeros((1, 1, 32)), jnp.zeros((1, 1, 32)), pages, pages,
                     jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32), None, 1, jnp.float32)
    assert seen == [tiling]
