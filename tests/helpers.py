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


def int4_checkpoint(src, dst, kind: str, group: int = 32, act_order: bool = False):
    """Two copies of checkpoint `src`: `dst`/packed with every projection weight in the 4-bit
    `kind` layout ("awq" / "gptq"), packed as AutoAWQ and AutoGPTQ pack them (asymmetric, per
    group of `group` inputs; act_order: GPTQ's groups of shuffled inputs, named by g_idx), and
    `dst`/dense with the float32 weights those stand for. Returns (packed, dense)."""
    import json
    from safetensors.torch import load_file as load_torch, save_file as save_torch
    packed, dense = Path(dst) / "packed", Path(dst) / "dense"
    for d in (packed, dense):
        shutil.copytree(src, d)
    (file,) = packed.glob("*.safetensors")
    tensors = load_torch(str(file))
    weights = dict(tensors)
    torch.manual_seed(0)
    for name in [n for n in tensors if n.split(".")[-2] in FP8_PROJECTIONS and n.endswith(".weight")]:
        w = tensors.pop(name).float()                                  # [out, in]
        g = torch.arange(w.shape[1]) // group
        g = g[torch.randperm(len(g))] if act_order else g
        lo = torch.stack([w[:, g == i].amin(1) for i in range(int(g.max()) + 1)], 1)   # [out, groups]
        hi = torch.stack([w[:, g == i].amax(1) for i in range(int(g.max()) + 1)], 1)
        scale = ((hi - lo) / 15).clamp(min=1e-6).half()
        zero = torch.round(-lo / scale.float()).clamp(1 if kind == "gptq" else 0, 15)   # GPTQ stores zero - 1
        q = torch.clamp(torch.round(w / scale.float()[:, g] + zero[:, g]), 0, 15).long()
        weights[name] = ((q - zero[:, g]) * scale.float()[:, g]).contiguous()
        base = name.removesuffix(".weight")
        intw, zeros = q.t(), zero.long().t() - (1 if kind == "gptq" else 0)   # [in, out], [groups, out]
        if kind == "gptq":
            tensors[base + ".qweight"] = _pack(intw, rows=True)
            tensors[base + ".g_idx"] = g.int()
        else:
            tensors[base + ".qweight"] = _pack(intw, order=(0, 2, 4, 6, 1, 3, 5, 7))
        tensors[base + ".qzeros"] = _pack(zeros, order=None if kind == "gptq" else (0, 2, 4, 6, 1, 3, 5, 7))
        tensors[base + ".scales"] = scale.t().contiguous()
    save_torch(tensors, str(file), metadata={"format": "pt"})
    save_torch(weights, str(next(dense.glob("*.safetensors"))), metadata={"format": "pt"})
    config = {"quant_method": kind, "bits": 4, "group_size": group}
    config.update({"version": "gemm", "zero_point": True} if kind == "awq" else {"desc_act": act_order, "sym": False})
    cfg = json.loads((packed / "config.json").read_text())
    (packed / "config.json").write_text(json.dumps({**cfg, "quantization_config": config}))
    return packed, dense


def _pack(values, rows: bool = False, order=None):
    """int [r, c] (each 0-15) -> int32, eight to a word: rows 8i..8i+7 in bits 4j of row i (rows),
    or columns 8k + order[j] in bits 4j of column k."""
    if rows:
        word = sum(values[j::8] << (4 * j) for j in range(8))
    else:
        word = sum(values[:, (order or range(8))[j]::8] << (4 * j) for j in range(8))
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32).contiguous()


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
