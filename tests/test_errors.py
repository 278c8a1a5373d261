"""Every bad input gets a clear, specific message (never a traceback from inside XLA)."""
import json
import shutil

import pytest

import jaxtp
from helpers import llama_copy, llama_edited, make_checkpoint
from jaxtp.config import ModelConfig


def edited_copy(src, dst, **config_changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_tp_larger_than_devices(checkpoint):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=16 .* needs 16 devices, but only 8 cpu"):
        jaxtp.load(checkpoint("llama")[0], tp=16)


def test_tp_must_divide_attention_heads(checkpoint):
    with pytest.raises(ValueError, match=r"attention heads \(8\) must be divisible by tensor parallel "
                                         r"size \(3\)"):
        jaxtp.load(checkpoint("llama")[0], tp=3)


def test_tp_must_divide_kv_heads_or_be_divided_by_them(tmp_path):
    make_checkpoint("llama", tmp_path, hidden_size=48, num_attention_heads=6, num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"key/value heads \(3\) must be divisible by tensor parallel "
                                         r"size \(2\)"):
        jaxtp.load(tmp_path, tp=2)


def test_tp_must_divide_intermediate_size(tmp_path):
    make_checkpoint("llama", tmp_path, intermediate_size=100)
    with pytest.raises(ValueError, match=r"intermediate_size \(100\) must be divisible"):
        jaxtp.load(tmp_path, tp=8)


def test_unknown_architecture_names_the_supported_ones(checkpoint, tmp_path):
    bad = edited_copy(checkpoint("llama")[0], tmp_path / "m", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"unsupported architecture \['GPT2LMHeadModel'\]: jaxtp supports "
                                         r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        jaxtp.load(bad)


def test_unsupported_rope_type(checkpoint, tmp_path):
    bad = edited_copy(checkpoint("llama")[0], tmp_path / "m",
                      rope_scaling={"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(ValueError, match=r"rope_type 'longrope' is not supported; supported: default, "
                                         r"linear, llama3, yarn"):
        jaxtp.load(bad)


def test_missing_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a hub id"):
        jaxtp.load(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        jaxtp.load(tmp_path)


def test_missing_tensor_is_named(checkpoint, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    dst = llama_edited(checkpoint, tmp_path, lambda t: {n: x for n, x in t.items() if n != name})
    with pytest.raises(KeyError, match=r"no tensor 'model.layers.1.mlp.up_proj.weight'"):
        jaxtp.load(dst)


def test_shape_mismatch_names_tensor_and_file(checkpoint, tmp_path):
    bad = edited_copy(checkpoint("llama")[0], tmp_path / "m", intermediate_size=256)
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.down_proj.weight' in .*model."
                                         r"safetensors has shape \(64, 128\), but config.json "
                                         r"implies \(64, 256\)"):
        jaxtp.load(bad)


def test_corrupt_weights_file_is_named(checkpoint, tmp_path):
    dst, file = llama_copy(checkpoint, tmp_path)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model.safetensors"):
        jaxtp.load(dst)


def test_bad_dtype(checkpoint):
    with pytest.raises(ValueError, match=r"dtype must be one of float32, bfloat16, float16 or 'auto', "
                                         r"got 'int8'"):
        jaxtp.load(checkpoint("llama")[0], dtype="int8")


@pytest.mark.parametrize("field,value,allowed", [
    ("max_tokens", 0, "an integer >= 1"), ("temperature", -0.5, "a number >= 0"),
    ("temperature", float("nan"), "a number >= 0"), ("top_p", 0.0, r"in \(0, 1\]"),
    ("top_p", 1.5, r"in \(0, 1\]"), ("top_k", -2, "-1, 0 \\(off\\) or a positive integer"),
    ("min_p", 2.0, r"in \[0, 1\]"), ("seed", 1.5, r"None or a 64-bit integer \(in \[-2\*\*63, 2\*\*64\)\)"),
    ("seed", 2 ** 64, r"None or a 64-bit integer \(in \[-2\*\*63, 2\*\*64\)\)"),
    ("seed", -2 ** 63 - 1, r"None or a 64-bit integer \(in \[-2\*\*63, 2\*\*64\)\)"),
    ("stop_token_ids", [-1], r"a list of token ids in \[0, 2147483647\]"),
    ("stop_token_ids", [2 ** 40], r"a list of token ids in \[0, 2147483647\]"),
    ("min_tokens", 99, r"an integer in \[0, max_tokens\]"), ("n", 0, r"an integer in \[1, 128\]"), ("n", 129, r"an integer in \[1, 128\]"),
    ("stop", [""], "a non-empty string or a list of non-empty strings"),
    ("stop", 7, "a non-empty string or a list of non-empty strings"),
    ("repetition_penalty", 0.0, r"a number > 0 \(1: off\)"),
    ("presence_penalty", 2.5, r"in \[-2, 2\]"), ("frequency_penalty", -3, r"in \[-2, 2\]"),
    ("logprobs", 21, r"None or an integer in \[0, 20\]"),
    ("prompt_logprobs", -1, r"None or an integer in \[0, 20\]"), ("ignore_eos", "yes", "True or False"),
])
def test_sampling_params_validation(field, value, allowed):
    with pytest.raises(ValueError, match=rf"SamplingParams.{field} must be {allowed}, got"):
        jaxtp.SamplingParams(**{field: value})


@pytest.fixture(scope="module")
def model(checkpoint):
    return jaxtp.load(checkpoint("llama")[0], tp=2, dtype="float32")


def test_bad_prompts(model):
    greedy = jaxtp.SamplingParams(max_tokens=2, temperature=0)
    with pytest.raises(ValueError, match=r"token id 200 is out of range for a vocabulary of 200"):
        jaxtp.generate(model, [[1, 200]], greedy)
    with pytest.raises(ValueError, match=r"a prompt is empty"):
        jaxtp.generate(model, [[]], greedy)
    with pytest.raises(ValueError, match=r"prompts is empty"):
        jaxtp.generate(model, [], greedy)
    with pytest.raises(TypeError, match=r"prompts must be a list of strings or a list of token-id lists"):
        jaxtp.generate(model, "hello", greedy)
    with pytest.raises(ValueError, match=r"has no tokenizer: pass token-id prompts"):
        jaxtp.generate(model, ["hello"], greedy)
    with pytest.raises(ValueError, match=r"prompt of 256 tokens does not fit the model's maximum length "
                                         r"of 256"):
        jaxtp.generate(model, [[5] * 256], greedy)
    with pytest.raises(ValueError, match=r"got 2 SamplingParams for 1 prompts"):
        jaxtp.generate(model, [[5]], [greedy, greedy])
    with pytest.raises(ValueError, match=r"has no tokenizer, so stop strings cannot be matched"):
        jaxtp.generate(model, [[5]], jaxtp.SamplingParams(stop="x"))
    with pytest.raises(ValueError, match=r"has no tokenizer, so it has no chat template"):
        jaxtp.chat_prompt(model, [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match=r"stop_token_ids: token id 200 is out of range for a vocabulary of 200"):
        jaxtp.generate(model, [[5]], jaxtp.SamplingParams(stop_token_ids=[200]))


def test_a_sequence_the_engine_cannot_schedule_fails_alone(model):
    """Params that slipped past validation fail at Engine.add with a ValueError, not later in a
    step that holds other sequences."""
    from jaxtp import engine
    params = jaxtp.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    bad = jaxtp.SamplingParams(max_tokens=6)
    bad.stop_token_ids = [2 ** 40]  # past SamplingParams' own check
    eng = engine.Engine(model, max_num_seqs=2, max_model_len=64)
    good = engine.Sequence([5, 6, 7], params, 0)
    eng.add(good)
    with pytest.raises(ValueError, match=r"cannot schedule this request: .*1099511627776"):
        eng.add(engine.Sequence([8, 9], bad, 0))
    while eng.has_unfinished:
        eng.step()
    assert good.tokens == jaxtp.generate(model, [[5, 6, 7]], params)[0].token_ids


def test_generation_is_capped_at_max_model_len(model):
    out = jaxtp.generate(model, [[5] * 250], jaxtp.SamplingParams(max_tokens=50, temperature=0,
                                                                 ignore_eos=True))[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def test_llm_rejects_unknown_arguments(checkpoint):
    with pytest.raises(TypeError, match=r"unsupported LLM argument\(s\): gpu_memory_typo"):
        jaxtp.LLM(model=str(checkpoint("llama")[0]), gpu_memory_typo=0.9)


def test_mlp_bias_rejected():
    with pytest.raises(ValueError, match="mlp_bias=true is not supported"):
        ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "mlp_bias": True,
                             "num_attention_heads": 2, "hidden_size": 8})
