"""Config normalization and RoPE frequencies against transformers' own functions."""
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxtp import rope
from jaxtp.config import ModelConfig


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048, "beta_fast": 16,
     "mscale": 1.0, "mscale_all_dim": 0.5},
])
def test_rope_frequencies_match_transformers(scaling):
    hf = transformers.LlamaConfig(hidden_size=1024, num_attention_heads=8, rope_theta=500000.0,
                                  max_position_embeddings=32768, rope_scaling=scaling)
    cfg = ModelConfig.from_hf({**hf.to_dict(), "architectures": ["LlamaForCausalLM"]})
    freq, scale = cfg.rope_inv_freq()
    if scaling is None:
        want = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128)
        want_scale = 1.0
    else:
        want, want_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, "cpu")
    np.testing.assert_allclose(freq, want.numpy(), rtol=1e-6)
    assert scale == pytest.approx(want_scale)


def test_rope_apply_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    q = np.random.default_rng(0).normal(size=(2, 5, 4, 16)).astype(np.float32)
    freq, _ = rope.inv_freq(16, 10000.0, {}, 128)
    pos = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    cos, sin = rope.cos_sin(pos, freq, 1.0)
    got = np.asarray(rope.apply(q, cos, sin))
    tq = torch.tensor(q).transpose(1, 2)
    want, _ = apply_rotary_pos_emb(tq, tq, torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin)))
    np.testing.assert_allclose(got, want.transpose(1, 2).numpy(), rtol=1e-5, atol=1e-6)


def test_family_quirks_become_fields():
    base = {"num_attention_heads": 4, "hidden_size": 32, "intermediate_size": 64, "vocab_size": 10,
            "num_hidden_layers": 1}
    qwen2 = ModelConfig.from_hf({**base, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096,
                                 "use_sliding_window": False, "eos_token_id": [5, 6]})
    assert qwen2.qkv_bias and not qwen2.qk_norm and qwen2.sliding_window is None
    assert qwen2.eos_token_ids == (5, 6) and qwen2.num_kv_heads == 4 and qwen2.head_dim == 8
    qwen3 = ModelConfig.from_hf({**base, "architectures": ["Qwen3ForCausalLM"], "head_dim": 16,
                                 "num_key_value_heads": 2}, {"eos_token_id": 9})
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim == 16 and qwen3.eos_token_ids == (9,)
    mistral = ModelConfig.from_hf({**base, "architectures": ["MistralForCausalLM"], "sliding_window": 4096})
    assert mistral.sliding_window == 4096
