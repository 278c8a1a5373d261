"""The decoder (Llama / Mistral / Qwen2 / Qwen3) as flax.nnx modules.

Attribute names mirror the Hugging Face checkpoint, so a parameter's nnx path *is* its tensor
name ('model.layers.0.self_attn.q_proj.weight'); `sharding.PARTITION_RULES` keys on that path.
Linear weights are stored [in, out]. There is no sharding code here: it lives in one table.

Every call writes the new tokens' keys/values into the cache at per-row offsets and attends over
the cache, so prefill, decode and ragged batches share one code path. How collectives and
attention run on the mesh is the `ops` argument (jaxtp.ops.OpsConfig; None: plain XLA), handed
down with the call rather than stored here.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtp import rope
from jaxtp.config import ModelConfig
from jaxtp.ops import allreduce, attention, paged, quant


def einsum_f32(spec: str, a, b):
    """einsum accumulating (and returning) float32. XLA:CPU has no bf16 x bf16 -> f32 dot, so
    there the operands are upcast instead (same result, slower; CPU is for tests)."""
    if jax.default_backend() == "cpu" and (a.dtype != jnp.float32 or b.dtype != jnp.float32):
        return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def split_matmul(x, weight, splits: int):
    """x [B, T, C] @ weight [C, ...] as `splits` products of equal slices of C: float32
    [splits, B, T, ...], for a kernel to sum in place of XLA's split-K reduction."""
    b, t, c = x.shape
    return einsum_f32("btsc,sc...->sbt...", x.reshape(b, t, splits, c // splits),
                      weight.reshape(splits, c // splits, *weight.shape[1:]))


class Packing(NamedTuple):
    """A prefill call's tokens packed [dp, N] for the projections, against the rows [B, T] that
    attention runs on (a chunk's rows pad, the packed tokens do not): unpack [B, T] gives each
    row position's index among its replica's packed tokens, pack [dp * N] each packed token's
    index among its replica's row positions (row * T + t). Where T is a multiple of the page
    size, every row starts on a page boundary (the scheduler cuts prompts there), so its keys
    and values are written page by page."""
    unpack: jax.Array
    pack: jax.Array


class Positions(NamedTuple):
    """Where a call's tokens go: row b's tokens sit at start[b] + t (pos [B, T]), with their
    rotary cos / sin [B, T, D], in the KV pages listed by row b's block table [B, W]; packing:
    the tokens' layout outside attention when it is not the rows' (None: the same)."""
    start: jax.Array
    pos: jax.Array
    cos: jax.Array
    sin: jax.Array
    table: jax.Array
    packing: Packing | None = None


QUERY_BLOCK = 512  # XLA's attention handles longer calls this many queries at a time


def _param(shape, dtype):
    return nnx.Param(jnp.zeros(shape, dtype))


def matmul(spec: str, x, weight, scale, w8a8: bool = False, ops=None, transposed: bool = False):
    """einsum of activations x [B, T, ..., in] with a weight that is plain, or int8 / fp8 with a
    per-output-channel `scale` (quantize.py). Weight-only: the weight is converted to the
    activation dtype inside XLA's GEMM, or, for a `transposed` weight (stored [out..., in], as
    q|k|v and gate|up are when 8-bit) where ops.quant turns it on, the kernel multiplies
    decode-sized batches. w8a8 (fp8): the activations are quantized too, with a scale per token,
    and the product is of fp8 values in XLA's fp8 GEMM, apart from decode-sized batches on GPUs,
    which take the weight-only product (quant.weight_only).

    A single row (batch-1 decode) is multiplied as two, the second zero: XLA rewrites a one-row
    product with a small weight (o_proj's block at tp=2) as a slow multiply and reduction, and
    its one-row GEMMs are slower than its two-row ones (docs/performance.md)."""
    if x.ndim > 1 and x.shape[0] * x.shape[1] == 1:
        return matmul(spec, jnp.concatenate([x, jnp.zeros_like(x)]), weight, scale, w8a8, ops, transposed)[:1]
    if scale is None:
        return jnp.einsum(spec, x, weight)
    if not w8a8 or quant.weight_only(x):
        if transposed and quant.applies(ops, x, weight):
            return quant.matmul(x, weight, scale, x.dtype)
        return jnp.einsum(spec, x, weight.astype(x.dtype)) * scale.astype(x.dtype)
    xq, x_scale = quantize_rows(x, weight.dtype)
    if jax.default_backend() != "gpu":  # fp8 products are exact in float32; the CPU runs them so
        xq, weight = xq.astype(jnp.float32), weight.astype(jnp.float32)
    y = jnp.einsum(spec, xq, weight, preferred_element_type=jnp.float32) * scale.astype(jnp.float32)
    x_scale = x_scale.reshape(*x_scale.shape[:-1], *(1,) * (y.ndim - x_scale.ndim + 1))
    return (y * x_scale).astype(x.dtype)


def quantize_rows(x, dtype):
    """x [..., in] -> (x / s in `dtype`, s [..., 1]): one scale per row (token), its absmax over
    the dtype's largest value."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
    x_scale = jnp.where(amax > 0, amax / float(jnp.finfo(dtype).max), 1.0)
    return (x / x_scale).astype(dtype), x_scale


class Projection(nnx.Module):
    """A weight stored [in, out...] (plain or 8-bit) or, 8-bit, [out..., in] (`weight_t`,
    quantize.py), with its scale; SPECS: the einsum of x with each layout."""
    SPECS = ("...i,io->...o", "...i,oi->...o")

    def _weight(self):
        """(the weight as stored, its scale or None)."""
        scale = None if self.scale is None else self.scale[...]
        return (self.weight[...] if self.weight_t is None else self.weight_t[...]), scale

    def _matmul(self, ops):
        transposed = self.weight_t is not None
        spec = self.SPECS[transposed]
        return lambda x, w, scale: matmul(spec, x, w, scale, self.w8a8, ops, transposed)


class Linear(Projection):
    def __init__(self, d_in: int, d_out: int, dtype, bias: bool = False):
        self.weight = _param((d_in, d_out), dtype)
        self.bias = _param((d_out,), dtype) if bias else None
        self.scale = nnx.data(None)  # a quantized weight's per-output-channel scale (quantize.py)
        self.weight_t = nnx.data(None)  # an 8-bit weight, [out, in], in place of weight
        self.w8a8 = False             # fp8 activations too (quantize.py)

    def __call__(self, x, ops=None):
        y = self._matmul(ops)(x, *self._weight())
        return y if self.bias is None else y + self.bias[...]


class RowLinear(Linear):
    """A row-parallel projection (o_proj, down_proj): its input features are split over tp, so
    each device's product is a partial sum; allreduce.row_parallel says how they are added."""

    def __call__(self, x, ops=None):
        return allreduce.row_parallel(ops, self._matmul(ops), x, *self._weight(), self.weight_t is not None)

    def add_norm(self, x, residual, norm: "RMSNorm | None", ops=None):
        """(residual + self(x), norm(that)): the decoder's residual add and the RMSNorm after it,
        done with the sum over tp (one kernel in allreduce's custom mode). norm=None: no norm."""
        if norm is None:
            return residual + self(x, ops), None
        return allreduce.row_parallel_add_norm(ops, self._matmul(ops), x, *self._weight(), residual,
                                               norm.weight[...], norm.eps, rms_norm, self.weight_t is not None)


def rms_norm(x, weight, eps: float):
    """RMSNorm as Llama computes it: normalized in float32, rounded to x's dtype, then scaled."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = _param((dim,), dtype)
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)


class QKVLinear(Projection):
    """q, k and v in one matmul. weight [d, tp, (q + k + v heads per device) * head_dim]: the
    explicit tp axis keeps every device's q|k|v block contiguous under column splitting."""
    SPECS = ("btd,dpw->btpw", "btd,pwd->btpw")

    def __init__(self, d: int, heads: int, kv_heads: int, head_dim: int, tp: int, dtype, bias: bool):
        self.head_dim = head_dim
        self.local = (heads // tp, kv_heads // tp, kv_heads // tp)
        width = sum(self.local) * head_dim
        self.weight = _param((d, tp, width), dtype)
        self.bias = _param((tp, width), dtype) if bias else None
        self.scale = nnx.data(None)  # a quantized weight's per-output-channel scale (quantize.py)
        self.weight_t = nnx.data(None)  # an 8-bit weight, [tp, width, d], in place of weight
        self.w8a8 = False

    def __call__(self, x, ops=None):
        """x [B, T, d] -> [B, T, tp, q|k|v heads per device, head_dim]."""
        y = self._matmul(ops)(x, *self._weight())
        if self.bias is not None:
            y = y + self.bias[...]
        return y.reshape(*y.shape[:3], -1, self.head_dim)

    def partials(self, x, splits: int):
        """x [B, T, d] -> float32 [splits, B, T, tp, heads, head_dim]: the products of `splits`
        equal slices of the contraction, for the decode kernel to sum (ops.attention.qkv_splits)."""
        y = split_matmul(x, self.weight[...], splits)
        return y.reshape(*y.shape[:4], -1, self.head_dim)

    def split(self, qkv):
        """[B, T, tp, q|k|v heads per device, head_dim] -> q, k, v [B, T, tp, heads per device, head_dim]."""
        nq, nk, _ = self.local
        return jnp.split(qkv, [nq, nq + nk], axis=3)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_kv_heads: int, tp: int, dtype):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, num_kv_heads, hd
        self.window = cfg.sliding_window
        self.qkv_proj = QKVLinear(d, cfg.num_heads, num_kv_heads, hd, tp, dtype, cfg.qkv_bias)
        self.o_proj = RowLinear(cfg.num_heads * hd, d, dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, at: Positions, k_cache, v_cache, ops=None, counters=None):
        """Attention of x's tokens, before o_proj (DecoderLayer applies it, fused with the
        residual add). x may carry padding rows past the cache's (CausalLM.hidden); they skip
        attention and come out zero (the Pallas decode step writes them so). counters: the
        decode kernel's, handed from layer to layer (ops.attention.decode)."""
        t = x.shape[1]
        proj = self.qkv_proj
        splits = attention.qkv_splits(ops, x.shape[0] * t, x.shape[2], k_cache, at.pos)
        if splits and self.q_norm is None and proj.bias is None and proj.scale is None:
            qkv = proj.partials(x, splits)  # summed in the decode kernel
        else:
            qkv = proj(x, ops)
        if self.q_norm is not None:
            q, k, v = proj.split(qkv)
            qkv = jnp.concatenate([self.q_norm(q), self.k_norm(k), v], axis=3)
        if at.packing is not None:  # attention on the rows, the rest on the packed tokens
            dp = 1 if ops is None else ops.dp
            rows = paged.take_rows(qkv.reshape(-1, *qkv.shape[2:]), at.packing.unpack, dp)
            out, k_cache, v_cache = self.xla_step(rows, at, k_cache, v_cache, ops)
            out = paged.take_rows(out.reshape(-1, self.num_heads * self.head_dim), at.packing.pack, dp)
            return out.astype(x.dtype).reshape(x.shape[0], t, -1), k_cache, v_cache, counters
        step = attention.decode(ops, qkv, at.cos, at.sin, k_cache, v_cache, at.pos, at.table, self.window,
                                self.num_heads, x.dtype, counters)
        if step is None:  # XLA's kernels
            out, k_cache, v_cache = self.xla_step(qkv, at, k_cache, v_cache, ops)
        else:
            out, k_cache, v_cache, counters = step
        out = out.astype(x.dtype).reshape(-1, t, self.num_heads * self.head_dim)
        if out.shape[0] < x.shape[0]:  # XLA's path: the padding rows come back as zeros
            out = jnp.concatenate([out, jnp.zeros((x.shape[0] - out.shape[0], *out.shape[1:]), out.dtype)])
        return out, k_cache, v_cache, counters

    def xla_step(self, qkv, at: Positions, k_cache, v_cache, ops=None):
        """Rope and cache write in XLA's kernels, then attention (the prefill kernel's where it
        applies, else XLA's) -> (out [B, T, KVH, G, D], caches)."""
        (b, t), d, dp = at.pos.shape, self.head_dim, 1 if ops is None else ops.dp
        q, k, v = (y[:b].reshape(b, t, -1, d) for y in self.qkv_proj.split(qkv))
        q, k = rope.apply(q, at.cos, at.sin), rope.apply(k, at.cos, at.sin)
        if at.packing is not None and t % k_cache.shape[2] == 0:  # the engine's rows: whole pages
            k_cache = paged.write_pages(k_cache, k, at.table, at.start, dp)
            v_cache = paged.write_pages(v_cache, v, at.table, at.start, dp, positions_last=True)
        else:
            k_cache = paged.write(k_cache, k, at.table, at.pos, dp)
            v_cache = paged.write(v_cache, v, at.table, at.pos, dp, positions_last=True)
        shape = (b, t, self.num_kv_heads, self.num_heads // self.num_kv_heads, d)
        out = attention.prefill(ops, q, k_cache, v_cache, at.table, at.start, self.window)
        if out is not None:
            return out.reshape(shape), k_cache, v_cache
        return self.xla_attention(q.reshape(shape), k_cache, v_cache, at, dp), k_cache, v_cache

    def xla_attention(self, q, k_cache, v_cache, at: Positions, dp: int):
        """XLA's attention of q [B, T, KVH, G, D] over each row's pages, the scores bounded to
        [QUERY_BLOCK, S] per head at a time: long rows in blocks of queries, many short rows
        (a prefill call's) in groups of rows, each group gathering only its own rows' pages."""
        b, t = at.pos.shape
        rows = max(1, QUERY_BLOCK // t)
        if t <= QUERY_BLOCK and b // dp > rows and (b // dp) % rows == 0:
            groups = b // dp // rows  # each group takes `rows` rows of every replica

            def split(x):
                return x.reshape(dp, groups, rows, *x.shape[1:]).swapaxes(0, 1).reshape(groups, dp * rows,
                                                                                           *x.shape[1:])

            def group(args):
                q, pos, table = args
                values = paged.gather(v_cache, table, dp, positions_last=True)
                return self.attend(q, paged.gather(k_cache, table, dp), values, pos)
            out = jax.lax.map(group, (split(q), split(at.pos), split(at.table)))
            return out.reshape(groups, dp, rows, *q.shape[1:]).swapaxes(0, 1).reshape(q.shape)
        keys = paged.gather(k_cache, at.table, dp)
        values = paged.gather(v_cache, at.table, dp, positions_last=True)
        if t > QUERY_BLOCK:
            blocks = q.reshape(b, t // QUERY_BLOCK, QUERY_BLOCK, *q.shape[2:]).swapaxes(0, 1)
            pos = at.pos.reshape(b, t // QUERY_BLOCK, QUERY_BLOCK).swapaxes(0, 1)
            out = jax.lax.map(lambda qp: self.attend(qp[0], keys, values, qp[1]), (blocks, pos))
            return out.swapaxes(0, 1).reshape(b, t, *q.shape[2:])
        return self.attend(q, keys, values, at.pos)

    def attend(self, q, keys, values, positions):
        """XLA's attention of q [B, T, KVH, G, D] over keys / values [B, KVH, S, D] (position s
        at index s) -> [B, T, KVH, G, D] (float32). 8-bit pages are read as q's dtype."""
        keys, values = keys.astype(q.dtype), values.astype(q.dtype)
        scores = einsum_f32("btkgd,bksd->bkgts", q, keys)
        scores = scores * (self.head_dim ** -0.5)
        key_pos = jnp.arange(keys.shape[2])
        visible = key_pos[None, None, :] <= positions[:, :, None]                 # [B, T, S]
        if self.window is not None:
            visible &= key_pos[None, None, :] > positions[:, :, None] - self.window
        scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        return einsum_f32("bkgts,bksd->btkgd", probs, values)


class GateUpLinear(Projection):
    """gate and up in one matmul: weight [d, 2, intermediate], split on the last axis."""
    SPECS = ("btd,dki->btki", "btd,kid->btki")

    def __init__(self, d: int, inter: int, dtype):
        self.weight = _param((d, 2, inter), dtype)
        self.scale = nnx.data(None)  # a quantized weight's per-output-channel scale (quantize.py)
        self.weight_t = nnx.data(None)  # an 8-bit weight, [2, intermediate, d], in place of weight
        self.w8a8 = False

    def __call__(self, x, ops=None):
        gate_up = self._matmul(ops)(x, *self._weight())
        return gate_up[:, :, 0], gate_up[:, :, 1]


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype):
        self.gate_up_proj = GateUpLinear(cfg.hidden_size, cfg.intermediate_size, dtype)
        self.down_proj = RowLinear(cfg.intermediate_size, cfg.hidden_size, dtype)

    def __call__(self, x, ops=None):
        """The MLP before down_proj (DecoderLayer applies it, fused with the residual add)."""
        gate, up = self.gate_up_proj(x, ops)
        return jax.nn.silu(gate) * up


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_kv_heads: int, tp: int, dtype):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, num_kv_heads, tp, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype)

    def __call__(self, x, normed, next_norm, at: Positions, k_cache, v_cache, ops=None, counters=None):
        """One layer on the residual stream x, given normed = input_layernorm(x). Returns
        (x after the layer, next_norm(that), caches, counters): next_norm is the next layer's
        input_layernorm or the final norm (None: not computed). Each residual add and the norm
        after it go with the all-reduce before them (RowLinear.add_norm), as in vLLM's layers."""
        out, k_cache, v_cache, counters = self.self_attn(normed, at, k_cache, v_cache, ops, counters)
        x, h = self.self_attn.o_proj.add_norm(out, x, self.post_attention_layernorm, ops)
        x, normed = self.mlp.down_proj.add_norm(self.mlp(h, ops), x, next_norm, ops)
        return x, normed, k_cache, v_cache, counters


@functools.partial(jax.jit, static_argnames=("graphdef", "ops"))
def run_layer(graphdef, weights, x, normed, at: Positions, k_cache, v_cache, ops=None, counters=None):
    """DecoderLayer.__call__ of (layer, next_norm) = nnx.merge(graphdef, weights), as a jitted
    function: the layers share one graphdef, so a program traces and lowers one layer (with its
    kernels) instead of every layer; XLA inlines the calls, so the compiled program is the same."""
    layer, next_norm = nnx.merge(graphdef, weights)
    return layer(x, normed, next_norm, at, k_cache, v_cache, ops, counters)


class Embedding(nnx.Module):
    """Vocab-parallel lookup (Megatron's VocabParallelEmbedding) written as SPMD: each of the tp
    row blocks gathers the ids it owns, the rest are zeroed, and the sum over blocks becomes one
    all-reduce of [B, T, d]. A plain `take` lets XLA all-gather the whole table every step."""

    def __init__(self, vocab: int, dim: int, tp: int, dtype):
        self.weight = _param((vocab, dim), dtype)
        self.tp = tp

    def __call__(self, tokens):
        vocab, dim = self.weight.shape
        blocks = self.weight[...].reshape(self.tp, vocab // self.tp, dim)
        local = tokens[None] - (jnp.arange(self.tp) * (vocab // self.tp))[:, None, None]
        owned = (local >= 0) & (local < vocab // self.tp)
        rows = jax.vmap(lambda w, i: jnp.take(w, i, axis=0, mode="clip"))(blocks, local)
        return jnp.sum(jnp.where(owned[..., None], rows, 0), axis=0, dtype=rows.dtype)


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_kv_heads: int, vocab: int, tp: int, dtype):
        self.embed_tokens = Embedding(vocab, cfg.hidden_size, tp, dtype)
        self.layers = nnx.List([DecoderLayer(cfg, num_kv_heads, tp, dtype) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class CausalLM(nnx.Module):
    """`num_kv_heads` and `vocab` are the sharded model's (KV heads replicated up to tp, vocab
    padded to split evenly); the true vocab size masks the padding out of the logits."""

    def __init__(self, cfg: ModelConfig, num_kv_heads: int, vocab: int, tp: int = 1, dtype=jnp.float32):
        self.model = Decoder(cfg, num_kv_heads, vocab, tp, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, vocab, dtype)
        self.vocab_size = cfg.vocab_size
        freq, scale = cfg.rope_inv_freq()
        self.rope_freq, self.rope_scale = tuple(freq.tolist()), scale

    def positions(self, start, t: int, table, packing: Packing | None = None) -> Positions:
        """Positions of rows of t tokens (with a packing, the rows' length is its own)."""
        t = t if packing is None else packing.unpack.shape[1]
        pos = start[:, None] + jnp.arange(t)[None, :]
        cos, sin = rope.cos_sin(pos, jnp.asarray(self.rope_freq, jnp.float32), self.rope_scale)
        return Positions(start, pos, cos, sin, table, packing)

    def hidden(self, tokens, cache, start, table, ops=None, packing: Packing | None = None):
        """Run tokens [B, T] placed at positions start[b] + t, in the pages of block table
        table [B, W]; returns (hidden [B, T, d], cache). cache: a (k, v) NamedTuple of
        per-layer page pools (engine.kv_cache.KVCache). With a packing, tokens are packed
        [dp, N] and start / table describe the rows of packing.unpack; hidden comes back packed.

        A single token (batch-1 decode) travels the layers with a zero second row, so every
        projection multiplies two rows (see `matmul`) without a padding kernel before each."""
        at = self.positions(start, tokens.shape[1], table, packing)
        x = self.model.embed_tokens(tokens)
        rows = x.shape[0]
        if x.shape[0] * x.shape[1] == 1:
            x = jnp.concatenate([x, jnp.zeros_like(x)])
        layers, ks, vs, counters = self.model.layers, [], [], None
        normed = layers[0].input_layernorm(x)
        for i, (layer, k_cache, v_cache) in enumerate(zip(layers, cache.k, cache.v)):
            next_norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            graphdef, weights = nnx.split((layer, next_norm))
            x, normed, k_cache, v_cache, counters = run_layer(graphdef, weights, x, normed, at, k_cache, v_cache,
                                                              ops, counters)
            ks.append(k_cache)
            vs.append(v_cache)
        return normed[:rows], cache._replace(k=ks, v=vs)

    def logits(self, h):
        """float32 logits over the padded vocab; padding entries are -inf so they are never sampled."""
        w = self.model.embed_tokens.weight[...].T if self.lm_head is None else self.lm_head.weight[...]
        logits = einsum_f32("...d,dv->...v", h, w)
        real = jnp.arange(logits.shape[-1]) < self.vocab_size
        return jnp.where(real, logits, -jnp.inf)
