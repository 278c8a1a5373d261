"""The memory budget: KV capacity from device memory left after the weights, and clear errors
with the numbers when a model or its cache cannot fit. CPU has no memory stats, so the tests
give each device's memory with device_memory_bytes."""
import pytest

import jaxtp
from jaxtp import memory

MIB = 2 ** 20


def llama_weight_bytes(tp, itemsize=4):
    """By hand for the conftest llama (d 64, 8 heads of 8, 2 KV heads, I 128, 2 layers,
    vocab 200 padded to 128 tp, untied): bytes on one device."""
    d, hd, inter, layers = 64, 8, 128, 2
    vocab = -(-200 // (128 * tp)) * 128 * tp
    kv = max(2, tp)
    per_layer = d * (8 + 2 * kv) * hd // tp + 8 * hd * d // tp + 2 * d * inter // tp + inter * d // tp + 2 * d
    return (layers * per_layer + 2 * vocab * d // tp + d) * itemsize


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_capacity_is_the_memory_left_after_weights(checkpoint, tp):
    path = checkpoint("llama")[0]
    model = jaxtp.load(path, tp=tp, dtype="float32", memory_fraction=0.5, device_memory_bytes=8 * MIB)
    per_token = 2 * 2 * (max(2, tp) // tp) * 8 * 4  # k and v, 2 layers, local KV heads, head_dim 8, f32
    plan = model.memory
    assert plan.weight_bytes == llama_weight_bytes(tp)
    assert plan.kv_bytes_per_token == per_token
    assert model.max_kv_tokens == (4 * MIB - llama_weight_bytes(tp)) // per_token
    assert plan.device_bytes == 8 * MIB and plan.fraction == 0.5


def test_bfloat16_halves_the_bytes(checkpoint):
    path = checkpoint("llama")[0]
    f32 = jaxtp.load(path, tp=2, dtype="float32", device_memory_bytes=8 * MIB).memory
    bf16 = jaxtp.load(path, tp=2, dtype="bfloat16", device_memory_bytes=8 * MIB).memory
    assert bf16.weight_bytes * 2 == f32.weight_bytes
    assert bf16.kv_bytes_per_token * 2 == f32.kv_bytes_per_token


def test_model_that_does_not_fit_fails_with_the_numbers(checkpoint):
    assert llama_weight_bytes(1) == 410880
    with pytest.raises(ValueError, match=r"the model does not fit: 410880 bytes of weights per device, "
                                         r"device memory 400000 bytes x memory_fraction 0.9 = 360000 bytes, "
                                         r"0 bytes already in use, leaving -50880 bytes for the KV cache at "
                                         r"256 bytes per token"):
        jaxtp.load(checkpoint("llama")[0], tp=1, dtype="float32", device_memory_bytes=400_000)


def test_cache_too_small_for_one_sequence(checkpoint):
    weights = llama_weight_bytes(1)
    with pytest.raises(ValueError, match=r"cannot hold one sequence of max_position_embeddings=256 tokens "
                                         r"\(65536 bytes per device\).*room for 100 tokens"):
        jaxtp.load(checkpoint("llama")[0], tp=1, dtype="float32", memory_fraction=1.0,
                   device_memory_bytes=weights + 100 * 256)


def test_memory_fraction_is_checked(checkpoint):
    with pytest.raises(ValueError, match=r"memory_fraction must be in \(0, 1\], got 1.5"):
        jaxtp.load(checkpoint("llama")[0], memory_fraction=1.5)


def test_cpu_default_shares_host_memory(checkpoint):
    model = jaxtp.load(checkpoint("llama")[0], tp=2, dtype="float32")
    assert abs(model.memory.device_bytes - memory.host_available() // 2) < 0.2 * model.memory.device_bytes
    assert model.max_kv_tokens >= model.max_model_len


def test_the_kv_pool_is_the_capacity_left_after_weights(checkpoint):
    """A budget with room for ~3 sequences of 256 tokens: the pool gets those pages, 8 prompts
    that grow to 153 tokens share it (waiting or preempted when it is full) and all finish."""
    from jaxtp import engine
    path, _ = checkpoint("llama")
    probe = jaxtp.load(path, tp=2, dtype="float32")
    per_token = probe.memory.kv_bytes_per_token
    need = probe.memory.in_use_bytes + probe.memory.weight_bytes + 3 * 256 * per_token + per_token // 2
    model = jaxtp.load(path, tp=2, dtype="float32", device_memory_bytes=need, memory_fraction=1.0)
    assert model.max_kv_tokens // 256 == 3
    eng = engine.Engine(model, max_num_seqs=8, max_model_len=256)
    assert eng.blocks.capacity * eng.blocks.page_size == 3 * 256
    params = jaxtp.SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)
    outs = jaxtp.generate(model, [[i + 3, 4, 5] for i in range(8)], params)
    want = jaxtp.generate(probe, [[i + 3, 4, 5] for i in range(8)], params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in want]
