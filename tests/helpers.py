"""What the tests share: tiny random checkpoints of each supported family saved with
transformers (the reference implementation), transformers' greedy tokens, edited copies of a
checkpoint, a free loopback port. No environment set-up here: tests/conftest.py and
benchmarks/parity.py (real GPUs) both build their models with it."""
import importlib.util
import shutil
import socket
import sys
from pathlib import Path

import torch
import transformers
from safetensors.numpy import load_file, save_file

import jaxtp

ROOT = Path(__file__).resolve().parent.parent

COMMON = dict(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# family -> (config class, model class, overrides). Each exercises a different quirk.
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                   dict(tie_word_embeddings=True, num_key_value_heads=8)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=12)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(head_dim=16, num_key_value_heads=1)),
}


def make_checkpoint(family: str, path, **overrides):
    """Save a tiny random `family` model to `path`; returns the torch reference model."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(sum(map(ord, family)))
    config = config_cls(**{**COMMON, **extra, **overrides})
    model = model_cls(config).eval()
    with torch.no_grad():  # random biases and norm weights, so those paths are really tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(path)
    return model


FP8_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fp8_checkpoint(src, dst, strategy: str, quantization_config: dict):
    """A copy of checkpoint `src` in Hugging Face's pre-quantized fp8 layout: every projection
    weight e4m3 with its `weight_scale` (absmax / 448 per output row, or per tensor), and
    `quantization_config` in config.json. Written with torch, as quantization tools do."""
    import json
    from safetensors.torch import load_file as load_torch, save_file as save_torch
    shutil.copytree(src, dst)
    (file,) = Path(dst).glob("*.safetensors")
    tensors = load_torch(str(file))
    for name in [n for n in tensors if n.split(".")[-2] in FP8_PROJECTIONS and n.endswith(".weight")]:
        w = tensors[name].float()
        amax = w.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w.abs().max()
        scale = amax / 448.0
        tensors[name] = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        tensors[name.removesuffix(".weight") + ".weight_scale"] = scale.float().contiguous()
    save_torch(tensors, str(file), metadata={"format": "pt"})
    cfg = json.loads((Path(dst) / "config.json").read_text())
    (Path(dst) / "config.json").write_text(json.dumps({**cfg, "quantization_config": quantization_config}))
    return dst


GREEDY = jaxtp.SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


def hf_greedy(model, prompt, n=32):
    """transformers' greedy continuation of `prompt` (n tokens, no EOS stop)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def llama_copy(checkpoint, tmp_path):
    """A copy of the llama test checkpoint: (its directory, its safetensors file)."""
    dst = tmp_path / "m"
    shutil.copytree(checkpoint("llama")[0], dst)
    return dst, dst / "model.safetensors"


def llama_edited(checkpoint, tmp_path, edit):
    """A copy of the llama checkpoint whose tensors are edit(tensors)."""
    dst, file = llama_copy(checkpoint, tmp_path)
    save_file(edit(load_file(file)), file)
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script(path: str):
    """A repository script (e.g. "scripts/convert.py") imported as a module, its folder on
    sys.path as when it runs."""
    file = ROOT / path
    sys.path.insert(0, str(file.parent))
    spec = importlib.util.spec_from_file_location(file.stem, file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def drive(eng, seqs):
    """Add `seqs` to engine `eng` and step it until all are finished; returns their tokens."""
    for s in seqs:
        eng.add(s)
    while eng.has_unfinished:
        eng.step()
    return [s.tokens for s in seqs]
