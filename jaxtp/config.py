"""One normalized `ModelConfig` for every supported Hugging Face decoder family.

The rest of jaxtp never looks at a raw config.json: family quirks (qkv bias, q/k norm,
tied embeddings, rope scaling) become plain fields here, checked once.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from jaxtp import int4, rope

# architecture name in config.json -> (qkv bias default, q/k norm)
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()  # sorted (key, value) pairs; hashable so the config can be a jit static
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # the checkpoint's own dtype, for dtype="auto"
    quantization: str | None = None  # a pre-quantized checkpoint's quantize.METHODS entry
    packed_int4: tuple = ()  # an AWQ / GPTQ checkpoint's int4.scheme: read dequantized, stored in 8 bits

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling)

    def rope_inv_freq(self) -> tuple[np.ndarray, float]:
        """(inverse frequencies [head_dim/2], cos/sin scale), as transformers computes them."""
        return rope.inv_freq(self.head_dim, self.rope_theta, self.rope_scaling_dict,
                             self.max_position_embeddings)

    @classmethod
    def from_hf(cls, hf: dict, generation_config: dict | None = None) -> "ModelConfig":
        """Normalize a parsed config.json (and optional generation_config.json)."""
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or hf.get('model_type')!r}: jaxtp supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        default_bias, qk_norm = SUPPORTED_ARCHITECTURES[arch]
        if hf.get("mlp_bias"):
            raise ValueError(f"{arch} with mlp_bias=true is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        if hf.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        scaling = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
        theta = scaling.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        scaling.pop("type", None)
        scaling = {} if rope_type == "default" else {**scaling, "rope_type": rope_type}
        # Sliding windows only bite past the window; Mistral/Qwen configs often carry one
        # while use_sliding_window is off.
        window = hf.get("sliding_window")
        if arch.startswith("Qwen"):
            if hf.get("use_sliding_window", False):
                raise ValueError(f"{arch} with use_sliding_window=true is not supported")
            window = None
        eos = _ids((generation_config or {}).get("eos_token_id")) or _ids(hf.get("eos_token_id"))
        cfg = cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(hf.get("attention_bias", default_bias)),
            qk_norm=qk_norm,
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(scaling.items())),
            sliding_window=window,
            eos_token_ids=eos,
            bos_token_id=hf.get("bos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            torch_dtype=hf.get("dtype") or hf.get("torch_dtype"),
            quantization=checkpoint_method(hf),
            packed_int4=int4.scheme(hf["quantization_config"]) if _packed_int4(hf) else (),
        )
        cfg.rope_inv_freq()  # fail now, not inside jit, on an unsupported rope type
        return cfg

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
        gen = path / "generation_config.json"
        return cls.from_hf(json.loads((path / "config.json").read_text()),
                           json.loads(gen.read_text()) if gen.is_file() else None)


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def checkpoint_method(hf: dict) -> str | None:
    """The METHODS entry a pre-quantized Hugging Face checkpoint's `quantization_config` stands
    for (None: not quantized), as vLLM reads them: "fp8" (per-tensor scales, dynamic
    activations) and "compressed-tensors" float8 (per-tensor or per-channel weight scales;
    dynamic per-token activations, or none: weight-only); 4-bit AWQ and GPTQ checkpoints stand
    for "int8", the 8 bits they are stored in here (int4.py). Anything else is refused by name."""
    q = hf.get("quantization_config")
    if not q:
        return None
    kind = q.get("quant_method")
    if _packed_int4(hf):  # its layout is checked by int4.scheme (ModelConfig.packed_int4)
        return "int8"
    if kind == "fp8":
        if q.get("weight_block_size"):
            raise ValueError("fp8 checkpoints with block-wise scales (weight_block_size) are not supported")
        if q.get("activation_scheme", "dynamic") != "dynamic":
            raise ValueError(f"fp8 activation_scheme {q['activation_scheme']!r} is not supported (only 'dynamic')")
        return "fp8"
    if kind != "compressed-tensors":
        raise ValueError(f"checkpoint quantization {kind!r} is not supported (fp8, compressed-tensors float8, "
                         f"awq or gptq)")
    methods = {_compressed_group(g) for g in q.get("config_groups", {}).values()}
    if len(methods) != 1:
        raise ValueError(f"compressed-tensors checkpoints need one quantization scheme, got {len(methods)}")
    return methods.pop()


def _packed_int4(hf: dict) -> bool:
    return (hf.get("quantization_config") or {}).get("quant_method") in ("awq", "gptq")


def _compressed_group(group: dict) -> str:
    w, a = group.get("weights") or {}, group.get("input_activations")
    if (w.get("num_bits"), w.get("type"), w.get("strategy")) not in ((8, "float", "tensor"), (8, "float", "channel")):
        raise ValueError(f"compressed-tensors weights {w} are not supported (8-bit float, per tensor or channel)")
    if a is None:
        return "fp8_weight_only"
    if (a.get("num_bits"), a.get("type"), a.get("dynamic"), a.get("strategy")) != (8, "float", True, "token"):
        raise ValueError(f"compressed-tensors input_activations {a} are not supported (8-bit float, dynamic, "
                         f"per token)")
    return "fp8"
