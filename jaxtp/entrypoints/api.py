"""The public API: `load`, `generate`, `stream`, and the vLLM-shaped `LLM` (with `chat`)."""
from __future__ import annotations

import dataclasses
import itertools
import random
from pathlib import Path
from typing import Iterator, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxtp import checkpoint, distributed, engine, memory, quantize
from jaxtp.config import ModelConfig
from jaxtp.engine import runner
from jaxtp.engine.sampling import SamplingParams
from jaxtp.entrypoints.outputs import Completion, Delta, Request, RequestOutput
from jaxtp.entrypoints.prompts import chat_prompt, check_ids, check_params, encode
from jaxtp.loading import load_state, param_shapes, resolve
from jaxtp.memory import MemoryPlan
from jaxtp.ops import OpsConfig
from jaxtp.sharding import (REPLICATED, kv_heads_on_mesh, make_mesh, named, padded_vocab, validate_pp,
                            validate_tp)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# vLLM's kv_cache_dtype names; "auto" is the model's dtype. fp8 pages are stored unscaled (vLLM's
# k_scale = v_scale = 1.0 when a checkpoint brings none): e4m3 keeps 3 mantissa bits up to 448.
KV_CACHE_DTYPES = {"auto": None, "fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn,
                   "fp8_e5m2": jnp.float8_e5m2}


@dataclasses.dataclass
class Model:
    """A loaded, sharded model: its config, mesh, tokenizer, the nnx graph/state pair, and how
its ops run on the mesh (`ops`: the all-reduce and decode-kernel modes, see jaxtp/ops).

    memory: the device-memory plan made at load (jaxtp.memory.MemoryPlan), None for models built
    without `load`. Its `max_kv_tokens` is the KV-cache capacity in tokens of each dp replica
    (sum over the rows it serves of their cached positions), after the weights, within
    `memory_fraction` of device memory; `kv_bytes_per_token` is what each token costs per device.
    """
    config: ModelConfig
    mesh: Mesh
    tokenizer: object | None
    graphdef: nnx.GraphDef
    params: nnx.State
    dtype: object
    path: Path
    memory: MemoryPlan | None = None
    ops: OpsConfig | None = None  # None: XLA's all-reduce and kernels on `mesh`
    enable_prefix_caching: bool = True  # engines on this model reuse the KV pages of known prefixes
    kv_cache_dtype: object = None  # the KV pages' dtype; None: the model's dtype
    _step_args: tuple | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.ops is None:
            self.ops = OpsConfig(self.mesh)

    @property
    def step_args(self) -> tuple[engine.ModelDef, list]:
        """(ModelDef, flat weights) for engine's jitted steps, made once per graphdef/params pair
        (a call with the nnx pair itself spends ~1.6 ms of host time re-hashing and flattening)."""
        made = self._step_args
        if made is None or made[0] is not self.graphdef or made[1] is not self.params:
            made = self._step_args = (self.graphdef, self.params, engine.split(self.graphdef, self.params))
        return made[2]

    @property
    def cache_dtype(self):
        return self.dtype if self.kv_cache_dtype is None else self.kv_cache_dtype

    @property
    def max_kv_tokens(self) -> int | None:
        """KV-cache tokens one dp replica may hold (see `memory`); None without a plan."""
        return None if self.memory is None else self.memory.max_kv_tokens

    @property
    def tp(self) -> int:
        return self.mesh.shape["tp"]

    @property
    def dp(self) -> int:
        return self.mesh.shape["dp"]

    @property
    def pp(self) -> int:
        return self.mesh.shape["pp"]

    @property
    def kv_heads(self) -> int:
        return kv_heads_on_mesh(self.config, self.tp)

    @property
    def padded_vocab(self) -> int:
        return padded_vocab(self.config, self.tp)

    @property
    def max_model_len(self) -> int:
        return self.config.max_position_embeddings

    def logits(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 next-token logits [B, T, vocab] for equal-length token-id prompts."""
        tokens = np.asarray([check_ids(self, ids) for ids in token_ids], np.int32)
        if tokens.ndim != 2:
            raise ValueError("Model.logits needs prompts of equal length")
        tokens = distributed.put(tokens, named(self.mesh, REPLICATED))
        out = runner.forward_logits(*self.step_args, tokens, self.ops)
        return distributed.fetch(out)[..., : self.config.vocab_size]


def load(model: str | Path, tp: int = 1, dtype: str = "bfloat16", dp: int = 1, devices=None,
         pp: int = 1, memory_fraction: float = 0.9, device_memory_bytes: int | None = None,
         quantization: str | None = None, all_reduce: str = "auto", kernels: str = "auto",
         enable_prefix_caching: bool = True, kv_cache_dtype: str = "auto") -> Model:
    """Load a Hugging Face checkpoint (local dir or hub id), or a directory made by
    scripts/convert.py (orbax, any tp), sharded over a (pp, dp, tp) mesh: tp-way tensor parallel,
    dp data-parallel replicas (splitting the batch), pp pipeline stages (splitting the layers). In
    a multi-process run (`distributed.initialize`) every process calls this with the same
    arguments and the mesh spans all processes' devices.

    dtype: "float32", "bfloat16", "float16", or "auto" (the checkpoint's own dtype).
    memory_fraction: share of each device's memory that weights + KV cache may use (vLLM's
    gpu_memory_utilization); the KV capacity is `Model.max_kv_tokens`. Raises if it cannot fit.
    device_memory_bytes: overrides each device's memory (CPU reports none: there the default is
    the host's available memory shared by the mesh's devices).
    quantization: None, "int8" (weight-only), "fp8_weight_only" or "fp8" (e4m3 weights and
    per-token activations) for 8-bit projections (quantize.py; dtype stays the activation and
    scale dtype). A checkpoint quantized to fp8 ("fp8" or compressed-tensors float8 in its
    quantization_config, as vLLM reads them) loads as its method says; a 4-bit AWQ / GPTQ one
    is read dequantized and stored as `quantization` says (default "int8").
    all_reduce: "auto" (the one-shot NVLink kernel on CUDA GPUs where it applies, else XLA's),
    "xla", "custom" or "shard_map"; see jaxtp/ops/allreduce.py.
    kernels: "auto" (the Pallas decode kernels on GPUs where they apply, else XLA's), "xla" or
    "pallas"; see jaxtp/ops/attention.py.
    enable_prefix_caching: engines on the model compute a prompt prefix they have seen once and
    share its KV pages (vLLM's automatic prefix caching; engine/block_manager.py).
    kv_cache_dtype: "auto" (the model's dtype) or "fp8" / "fp8_e4m3" / "fp8_e5m2": 8-bit KV pages,
    twice the tokens in the same memory and half the bytes attention reads (vLLM's option; the
    README states its accuracy).
    """
    if dtype not in (*DTYPES, "auto"):
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or 'auto', got {dtype!r}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, "
                         f"got {kv_cache_dtype!r}")
    if quantization not in (None, *quantize.METHODS):
        raise ValueError(f"quantization must be None or one of {', '.join(map(repr, quantize.METHODS))}, "
                         f"got {quantization!r}")
    path = resolve(model)
    cfg = ModelConfig.from_dir(path)
    if cfg.packed_int4:  # 4-bit AWQ / GPTQ: read dequantized, stored in any 8-bit method (default int8)
        quantization = quantization or cfg.quantization
    elif cfg.quantization is not None:  # pre-quantized fp8: read dequantized, quantized again per channel
        if quantization not in (None, cfg.quantization):
            raise ValueError(f"{path} holds {cfg.quantization} weights; quantization={quantization!r} "
                             f"cannot be applied to them")
        quantization = cfg.quantization
    orbax = checkpoint.is_orbax_dir(path)
    if dtype == "auto":
        own = checkpoint.read_marker(path)["dtype"] if orbax else cfg.torch_dtype
        dtype = own if own in DTYPES else "float32"
    mesh = make_mesh(tp=tp, dp=dp, pp=pp, devices=devices)
    validate_tp(cfg, tp)
    validate_pp(cfg, pp)
    ops = OpsConfig.resolve(mesh, all_reduce, kernels)
    if orbax and pp > 1:
        raise ValueError(f"{path} is an orbax checkpoint, which loads with pp=1 only; load the "
                         f"Hugging Face checkpoint it was converted from for pp={pp}")
    weights = memory.weight_bytes(param_shapes(cfg, mesh, DTYPES[dtype]), DTYPES[dtype])
    cache_dtype = KV_CACHE_DTYPES[kv_cache_dtype] or DTYPES[dtype]
    plan = memory.plan(cfg, tp, cache_dtype, weights, memory_fraction, mesh, device_memory_bytes)
    graphdef, params = (checkpoint.restore if orbax else load_state)(path, cfg, mesh, DTYPES[dtype])
    if quantization is not None:
        graphdef, params = quantize.quantize(graphdef, params, mesh, quantization)  # then size the cache anew
        plan = memory.plan(cfg, tp, cache_dtype, memory.array_bytes(params), memory_fraction, mesh,
                           device_memory_bytes)
    return Model(cfg, mesh, _tokenizer(path), graphdef, params, DTYPES[dtype], path, plan, ops, enable_prefix_caching,
                 KV_CACHE_DTYPES[kv_cache_dtype])


def _tokenizer(path: Path):
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def _encode(model: Model, prompts) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], (int, np.integer))):
        raise TypeError("prompts must be a list of strings or a list of token-id lists, e.g. ['Hi'] or [[1, 2]]")
    if not prompts:
        raise ValueError("prompts is empty")
    out = [encode(model, p) for p in prompts]
    for ids in out:
        if len(ids) >= model.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit the model's maximum length "
                             f"of {model.max_model_len} (max_position_embeddings) with room to generate")
    return out


def _requests(model: Model, prompts, params) -> list[Request]:
    ids = _encode(model, prompts)
    params = params if params is not None else SamplingParams()
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(ids)
    if len(plist) != len(ids):
        raise ValueError(f"got {len(plist)} SamplingParams for {len(ids)} prompts")
    for p in plist:
        check_params(model, p)
    if model.tokenizer is None and any(p.stop for p in plist):
        raise ValueError(f"{model.path} has no tokenizer, so stop strings cannot be matched: "
                         "use stop_token_ids")
    # Never run past the model's maximum length (vLLM's max_model_len).
    plist = [p if len(x) + p.max_tokens <= model.max_model_len else
             dataclasses.replace(p, max_tokens=model.max_model_len - len(x),
                                 min_tokens=min(p.min_tokens, model.max_model_len - len(x)))
             for x, p in zip(ids, plist)]
    return [Request(str(next(_REQUEST_IDS)), prompt, x, p, model.tokenizer)
            for prompt, x, p in zip(prompts, ids, plist)]


_REQUEST_IDS = itertools.count()


def _drive(model: Model, requests: list[Request], chunk: int) -> Iterator[Delta]:
    """Run requests to completion on one engine, yielding a Delta whenever a sample advances."""
    owner = {id(s): r for r in requests for s in r.seqs}
    seqs = [s for r in requests for s in r.seqs]
    for eng, changed in engine.run(model, seqs, chunk):
        for seq in changed:
            delta = owner[id(seq)].update(seq)
            if delta.stop_str is not None:
                eng.stop(seq, delta.stop_str, delta.num_tokens)
            yield delta


def generate(model: Model, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
             ) -> list[Completion]:
    """Generate for a batch of prompts (strings or token-id lists), each with its own params.
    Returns one Completion per prompt, or params.n consecutive ones when n > 1."""
    requests = _requests(model, prompts, params)
    for _ in _drive(model, requests, chunk=16):
        pass
    return [c for r in requests for c in r.completions()]


def stream(model: Model, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
           chunk: int = 4) -> Iterator[Delta]:
    """Like `generate`, but yields text deltas as they are produced: Delta(request, index, text,
    token_ids, finish_reason), where `request.output()` gives the full RequestOutput so far.
    Every `chunk` tokens per sequence cost one host round trip."""
    for delta in _drive(model, _requests(model, prompts, params), chunk):
        if delta.text or delta.token_ids or delta.finish_reason:
            yield delta


class LLM:
    """vLLM-shaped entry point: `LLM(model=..., tensor_parallel_size=2).generate(prompts, params)`."""

    def __init__(self, model: str, tensor_parallel_size: int = 1, dtype: str = "auto",
                 seed: int | None = None, data_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, quantization: str | None = None,
                 disable_custom_all_reduce: bool = False, enable_prefix_caching: bool = True,
                 kv_cache_dtype: str = "auto", **kwargs):
        if kwargs:
            raise TypeError(f"unsupported LLM argument(s): {', '.join(sorted(kwargs))}")
        if seed is not None:
            random.seed(seed)
        self.model = load(model, tp=tensor_parallel_size, dtype=dtype, dp=data_parallel_size,
                          pp=pipeline_parallel_size, memory_fraction=gpu_memory_utilization,
                          quantization=quantization, all_reduce="xla" if disable_custom_all_reduce else "auto",
                          enable_prefix_caching=enable_prefix_caching, kv_cache_dtype=kv_cache_dtype)

    def get_tokenizer(self):
        return self.model.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        if isinstance(prompts, str):
            prompts = [prompts]
        requests = _requests(self.model, prompts, sampling_params)
        for _ in _drive(self.model, requests, chunk=16):
            pass
        return [r.output() for r in requests]

    def chat(self, messages, sampling_params: SamplingParams | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """One conversation (a list of {'role', 'content'} dicts) or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        ids = [chat_prompt(self.model, c, add_generation_prompt, chat_template) for c in convs]
        return self.generate(ids, sampling_params)
