"""A Pallas (Triton) decode step of attention over the paged KV cache: rotary embedding, cache
write and attention of one new token per row, in one kernel.

XLA runs this step as a chain of small kernels (rope, a slice per cache write, scores over the
whole cache, mask, softmax, probabilities times values, padding) that write and re-read
intermediates and always cover the full cache length; at batch 1 each costs more in launch than
in bytes. Here the grid is (row, KV head, split of the sequence), flash-decoding style: each
row's live positions are split evenly, so a short row and a long one both keep every split
busy. Each program rotates its query heads and its KV head's new key, streams its split of the
cached keys and values once, a page per loop step (the page ids read from the row's block
table), and keeps an online softmax in registers. The program whose split holds the new
position writes the new key and value into its page (in place: the pools are aliased to the
outputs) and adds that token from registers, so no program reads a slot another one writes. The query heads sharing a KV head (GQA) are handled together,
padded to 16 rows for the tensor cores; only the real rows are stored.

With several splits, each program stores its partials (unnormalized output, running max and
sum) and counts itself in with an atomic add on its (row, KV head) counter; the last to arrive
merges the splits and writes the output, already in the layout o_proj reads ([R, heads, D],
padding rows zeroed), where XLA's merge took three more kernels per layer. The counters come
in zeroed and go out zeroed (the merging program resets its own), so one array serves every
layer of a step. At a few rows qkv can arrive as the float32 partial sums of its split
contraction, which the kernel adds (one XLA reduction kernel fewer per layer). The figures
behind each choice are in docs/performance.md.

Runs on GPUs through Triton and anywhere in Pallas interpret mode (the CPU tests).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxtp.ops import paged


@dataclasses.dataclass(frozen=True)
class Config:
    programs: int = 128    # split the sequence until the grid has about this many (~1 per SM)
    min_blocks: int = 2    # ...but give each split at least this many blocks
    warps: int = 4
    wide_8bit_warps: int = 2  # 8-bit pages when rows x KV heads alone pass `programs` (docs/performance.md)
    stages: int = 3


def supported(page_size: int, head_dim: int) -> bool:
    """A page is one loop step: tensor-core dots need 16 of its keys, and 16 rows of each half
    of the head (the rotary embedding's halves)."""
    return 16 <= page_size <= 256 and page_size & (page_size - 1) == 0 and head_dim in (32, 64, 128, 256)


def splits_for(rows: int, kv_heads: int, max_len: int, block: int, config: Config) -> int:
    """Splits per (row, KV head): enough programs to keep every SM streaming, but no more than
    a row of `max_len` positions can give `config.min_blocks` pages each."""
    most = max(1, pl.cdiv(max_len, block * config.min_blocks))
    return min(max(1, config.programs // (rows * kv_heads)), most)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static shape of one call, shared by the kernel's pieces."""
    b: int              # real rows
    r: int              # rows of qkv and out (padding rows past b)
    kvh: int
    g: int              # query heads per KV head
    d: int
    rows: int           # g padded to the tensor cores' 16
    parts: int          # split-K partial sums in qkv (0: qkv is whole)
    num_heads: int
    splits: int         # sequence splits per (row, KV head)
    block: int          # keys per loop step: one page
    dt: object          # the activations' dtype
    cache: object       # the pages' dtype
    precision: tuple | None
    interpret: bool

    @property
    def half(self) -> int:
        return self.d // 2

    @property
    def scale(self) -> float:
        return self.d ** -0.5

    @property
    def dot(self):
        """The loop's dot operands' dtype. Triton converts 8-bit pages to float16 in one
        instruction per two values (to bfloat16 only through float32, which measured slower),
        and bfloat16 queries and probabilities round into float16 exactly but for
        underflow below 2^-14, so bfloat16 activations read 8-bit pages as float16."""
        return jnp.dtype(jnp.float16) if self.cache.itemsize == 1 and self.dt == jnp.bfloat16 else self.dt


def _plan(qkv, k_pages, v_pages, table, num_heads: int, dtype, config: Config, interpret: bool | None) -> _Plan:
    (_, kvh, block, d), (b, width) = k_pages.shape, table.shape
    if not supported(block, d):
        raise ValueError(f"decode attention: unsupported page size {block} / head_dim {d}")
    if v_pages.shape != paged.value_pages_shape(k_pages.shape) or v_pages.dtype != k_pages.dtype:
        raise ValueError(f"decode attention: value pages {v_pages.shape} {v_pages.dtype} are not "
                         f"{paged.value_pages_shape(k_pages.shape)} {k_pages.dtype} (key pages {k_pages.shape}, "
                         f"positions last)")
    parts = qkv.shape[0] if qkv.ndim == 4 else 0  # split-K partial sums to add, if any
    r = qkv.shape[-3] if qkv.ndim in (3, 4) else 0
    if (qkv.ndim not in (3, 4) or qkv.shape[-2:] != (num_heads + 2 * kvh, d) or not b <= r <= 2 * b
            or (parts and qkv.dtype != jnp.float32)):
        raise ValueError(f"decode attention: qkv {qkv.shape} does not match {num_heads} query heads, "
                         f"pages {k_pages.shape}, table {table.shape}")
    splits = splits_for(b, kvh, width * block, block, config)
    # Triton multiplies float32 in TF32 unless told otherwise; follow jax's matmul precision
    # setting as XLA's dots do ("highest" / "float32": full float32).
    full = str(jax.config.jax_default_matmul_precision).lower() in ("highest", "float32")
    if dtype is None and parts and k_pages.dtype.itemsize == 1:
        raise ValueError("decode attention: float32 qkv partials over 8-bit pages need the activations' dtype")
    if dtype is None:
        dtype = k_pages.dtype if parts else qkv.dtype
    return _Plan(b, r, kvh, num_heads // kvh, d, max(16, pl.next_power_of_2(num_heads // kvh)), parts,
                 num_heads, splits, block, jnp.dtype(dtype), jnp.dtype(k_pages.dtype),
                 (jax.lax.Precision.HIGHEST,) * 2 if full else None,
                 jax.default_backend() != "gpu" if interpret is None else interpret)


def attend(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
           table: jax.Array, pos: jax.Array, lo: jax.Array, num_heads: int, counters: jax.Array | None = None,
           dtype=None, config: Config = Config(), interpret: bool | None = None):
    """One decode step of attention for rows b < B = pos.shape[0].

    qkv [R, num_heads + 2 * KVH, D] with B <= R <= 2B: the projected q | k | v heads of the new
    token, before the rotary embedding (rows past B are padding), or [S, R, ...] float32: the
    projection's contraction split S ways, summed here and rounded to the caches' dtype in
    place of XLA's split-K reduction kernel; cos, sin [B, D] (float32, rope.cos_sin at pos);
    k_pages [P, KVH, page_size, D], v_pages [P, KVH, D, page_size]; table [B, W]: row b's
    position p is at page table[b, p // page_size]; pos [B]: the new token's position; lo [B]:
    the first visible position (sliding windows); counters: int32 [B, KVH] zeros, the splits'
    arrival counters, or None for fresh ones. Every call hands them back zeroed (the last
    program of a row and head resets its own), so a step's layers can share one array instead
    of a memset each. dtype: the activations' (qkv's, or the caches' for float32 partials, if
    None); 8-bit pages are read as it, and the new key and value attend as the pages hold them.
    Returns (out [R, KVH, G, D] in `dtype`: softmax(q k^T / sqrt(D)) v over positions
    [lo, pos] for rows < B, zeros for the padding rows; k_pages, v_pages with the new key and
    value written at pos; counters, or the ones given where this call needed none).
    """
    plan = _plan(qkv, k_pages, v_pages, table, num_heads, dtype, config, interpret)
    b, kvh, d, f32 = plan.b, plan.kvh, plan.d, jnp.float32
    out_shape = [jax.ShapeDtypeStruct((plan.r, num_heads, d), plan.dt),
                 jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                 jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)]
    args = [pos.astype(jnp.int32), lo.astype(jnp.int32), table.astype(jnp.int32), qkv, cos.astype(f32),
            sin.astype(f32), k_pages, v_pages]
    aliases = {6: 1, 7: 2}
    if plan.splits > 1:  # outputs: + the partials and the counters
        out_shape += [jax.ShapeDtypeStruct((b, kvh, plan.splits, plan.rows, d), f32),
                      jax.ShapeDtypeStruct((b, kvh, plan.splits, plan.rows), f32),
                      jax.ShapeDtypeStruct((b, kvh, plan.splits, plan.rows), f32),
                      jax.ShapeDtypeStruct((b, kvh), jnp.int32)]
        args.append(jnp.zeros((b, kvh), jnp.int32) if counters is None else counters)
        aliases[8] = 6
    out, k_pages, v_pages, *split_out = pl.pallas_call(
        functools.partial(_kernel, plan), grid=(b, kvh, plan.splits), interpret=plan.interpret,
        out_shape=tuple(out_shape), input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=_warps(plan, config), num_stages=config.stages),
    )(*args)
    if plan.splits > 1:
        counters = split_out[3]
    return out.reshape(plan.r, kvh, plan.g, d), k_pages, v_pages, counters


def _warps(plan: _Plan, config: Config) -> int:
    wide = plan.b * plan.kvh > config.programs  # the grid is past one program per SM without splits
    return config.wide_8bit_warps if wide and plan.cache.itemsize == 1 else config.warps


def _kernel(plan: _Plan, pos_ref, lo_ref, table_ref, qkv_ref, cos_ref, sin_ref, k_ref, v_ref, *refs):
    """One program: row, KV head, split of the sequence."""
    out_ref, k_out, v_out, *split_refs = refs[-7:] if plan.splits > 1 else refs  # (counters in,) outputs
    row, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    now, start = pos_ref[row], lo_ref[row]
    c = cos_ref[row, pl.ds(0, plan.half)].astype(plan.dt)
    sn = sin_ref[row, pl.ds(0, plan.half)].astype(plan.dt)
    real = jnp.arange(plan.rows) < plan.g
    q1, q2, k1, k2, v_new = _new_token(plan, qkv_ref, row, head, c, sn, real)

    # The row's live positions [first page of start, now] in `splits` equal runs of whole pages.
    origin = start // plan.block * plan.block
    chunk = pl.cdiv(pl.cdiv(now + 1 - origin, plan.splits), plan.block) * plan.block
    mine = (now - origin) // chunk == split  # this program holds the new position: it writes it
    @pl.when(mine)
    def _():
        page, at = table_ref[row, now // plan.block], now % plan.block
        k_out[page, head, at, pl.ds(0, plan.half)] = k1.astype(k_out.dtype)
        k_out[page, head, at, pl.ds(plan.half, plan.half)] = k2.astype(k_out.dtype)
        v_out[page, head, :, at] = v_new.astype(v_out.dtype)

    base = origin + split * chunk
    m, l, acc = _attend_cached(plan, k_ref, v_ref, table_ref, row, head, base, base + chunk, start, now, q1, q2)
    m, l, acc = _attend_new(plan, m, l, acc, mine, q1, q2, k1, k2, v_new)
    if plan.splits == 1:
        return _store(plan, out_ref, row, head, acc, l, real)
    _merge(plan, out_ref, split_refs, row, head, split, m, l, acc, real)


def _mul(dt, x, y):  # one product rounded to the activations' dtype, as XLA's rope computes it
    return (x.astype(jnp.float32) * y.astype(jnp.float32)).astype(dt)


def _rotate(dt, x1, x2, c, sn):  # rope.apply on the two halves: x * cos + rotate_half(x) * sin
    return ((_mul(dt, x1, c).astype(jnp.float32) - _mul(dt, x2, sn).astype(jnp.float32)).astype(dt),
            (_mul(dt, x2, c).astype(jnp.float32) + _mul(dt, x1, sn).astype(jnp.float32)).astype(dt))


def _load_qkv(plan: _Plan, qkv_ref, *at, mask=None):
    """A slice of qkv (its partial sums added in order and rounded, if it comes split)."""
    load = lambda *i: plt.load(qkv_ref.at[i], mask=mask, other=None if mask is None else 0)  # noqa: E731
    if not plan.parts:
        return load(*at)
    total = load(jnp.int32(0), *at)
    for i in range(1, plan.parts):
        total += load(jnp.int32(i), *at)
    return total.astype(plan.dt)


def _new_token(plan: _Plan, qkv_ref, row, head, c, sn, real):
    """The new token's rotated query heads (halves [rows, D/2]), key (halves) and value [D]."""
    g, half, n = plan.g, plan.half, plan.num_heads
    qs = [_load_qkv(plan, qkv_ref, row, pl.ds(head * g, plan.rows), pl.ds(h * half, half), mask=real[:, None])
          for h in (0, 1)]
    q1, q2 = _rotate(plan.dt, *qs, c[None], sn[None])
    k1, k2 = _rotate(plan.dt, _load_qkv(plan, qkv_ref, row, n + head, pl.ds(0, half)),
                     _load_qkv(plan, qkv_ref, row, n + head, pl.ds(half, half)), c, sn)
    v_new = _load_qkv(plan, qkv_ref, row, n + plan.kvh + head, pl.ds(0, plan.d))
    return q1, q2, *(_as_cached(plan, x) for x in (k1, k2, v_new))


def _as_cached(plan: _Plan, x):
    """x as the pages hold it (rounded through 8-bit pages; as it is otherwise), so the new token
    scores the same in this step as in later ones."""
    return x if plan.cache == plan.dt else paged.as_cached(x, plan.cache).astype(plan.dt)


def _attend_cached(plan: _Plan, k_ref, v_ref, table_ref, row, head, base, end, start, now, q1, q2):
    """Online softmax over the cached keys in [start, now) of this split's pages [base, end):
    (max, sum, acc [rows, D])."""
    block, half, keys, width = plan.block, plan.half, pl.ds(0, plan.block), table_ref.shape[1]
    dot = plan.dot
    f1, f2 = (paged.saturate(q, dot) for q in (q1, q2))  # float16 holds less than bfloat16

    def body(i, carry):
        m, l, acc, page = carry
        # The next page's id is loaded now, so its latency hides behind this page's work.
        following = table_ref[row, jnp.minimum(i + 1, width - 1)]
        at_pos = i * block + jnp.arange(block)
        live = (at_pos >= start) & (at_pos < now)  # keys outside it are never read from memory

        def load_k(lanes):
            # a float fill: Triton casts no integer constant to fp8 pages' dtype
            return plt.load(k_ref.at[page, head, keys, lanes], mask=live[:, None], other=0.0).astype(dot)
        scores = (plt.dot(f1, load_k(pl.ds(0, half)), trans_b=True, precision=plan.precision)
                  + plt.dot(f2, load_k(pl.ds(half, half)), trans_b=True, precision=plan.precision))
        scores = jnp.where(live, scores * plan.scale, -jnp.inf)
        m_new, alpha, p = online(m, scores, axis=1)
        # Values load in 16-position granules: a mask constant over 16 positions lets the load of
        # [D, page] go in 16-byte copies. Stale positions in a granule get p = 0 (pages hold
        # finite values only: writes saturate).
        granule = i * block + jax.lax.div(jnp.arange(block), 16) * 16
        near = (granule + 16 > start) & (granule < now)
        v = plt.load(v_ref.at[page, head, pl.ds(0, plan.d), keys], mask=near[None, :], other=0.0).astype(dot)
        pv = plt.dot(p.astype(plan.dt).astype(dot), v, trans_b=True, precision=plan.precision)  # p rounded as XLA's
        return m_new, l * alpha + p.sum(axis=1), acc * alpha[:, None] + pv, following

    first = base // block
    last = jnp.clip(pl.cdiv(jnp.minimum(now, end), block), first, end // block)  # cached keys: before `now`
    init = (jnp.full((plan.rows,), -jnp.inf, jnp.float32), jnp.zeros((plan.rows,), jnp.float32),
            jnp.zeros((plan.rows, plan.d), jnp.float32), table_ref[row, jnp.minimum(first, width - 1)])
    return jax.lax.fori_loop(first, last, body, init)[:3]


def _attend_new(plan: _Plan, m, l, acc, mine, q1, q2, k1, k2, v_new):
    """The new token itself, from registers (only in the program holding its position)."""
    new = (jnp.sum(q1.astype(jnp.float32) * k1.astype(jnp.float32)[None], axis=1)
           + jnp.sum(q2.astype(jnp.float32) * k2.astype(jnp.float32)[None], axis=1)) * plan.scale
    m, alpha, p = online(m, jnp.where(mine, new, -jnp.inf))
    pv = p.astype(v_new.dtype).astype(jnp.float32)[:, None] * v_new.astype(jnp.float32)[None]
    return m, l * alpha + p, acc * alpha[:, None] + pv


def _store(plan: _Plan, out_ref, row, head, acc, l, real):
    """The output, and zeros for this program's padding row, if any."""
    heads = pl.ds(head * plan.g, plan.rows)
    plt.store(out_ref.at[row, heads], (acc / l[:, None]).astype(out_ref.dtype), mask=real[:, None])

    @pl.when(plan.b + row < plan.r)
    def _():
        plt.store(out_ref.at[plan.b + row, heads], jnp.zeros((plan.rows, plan.d), out_ref.dtype),
                  mask=real[:, None])


def _merge(plan: _Plan, out_ref, split_refs, row, head, split, m, l, acc, real):
    """Store this split's partials and count it in; the last of the row and head to arrive
    merges them all and stores the output."""
    o_ref, m_ref, l_ref, count = split_refs
    plt.store(o_ref.at[row, head, split], acc, mask=real[:, None])
    plt.store(m_ref.at[row, head, split], m, mask=real)
    plt.store(l_ref.at[row, head, split], l, mask=real)
    # Release this program's partials, then count it in; the last of the row and head to
    # arrive acquires them all (the atomic is acq_rel at GPU scope; the barrier first makes
    # every thread's stores part of the release, as CUTLASS's semaphores do; the loads below
    # are volatile, so no stale L1 line can serve them).
    if not plan.interpret:
        plt.debug_barrier()
    arrived = plt.atomic_add(count, (row, head), jnp.int32(1))

    @pl.when(arrived == plan.splits - 1)
    def _():  # all splits at once: [splits, rows] maxima and sums, [splits, D] per query head
        n = pl.next_power_of_2(plan.splits)
        ok = jnp.arange(n) < plan.splits
        both = ok[:, None] & real[None]
        m_all = plt.load(m_ref.at[row, head, pl.ds(0, n)], mask=both, other=-jnp.inf, volatile=True)
        l_all = plt.load(l_ref.at[row, head, pl.ds(0, n)], mask=both, other=0, volatile=True)
        top = m_all.max(axis=0)
        w = jnp.exp(m_all - jnp.where(top == -jnp.inf, 0.0, top)[None])    # [splits, rows]
        merged = jnp.zeros((plan.rows, plan.d), jnp.float32)
        at_row = jnp.arange(plan.rows)
        for h in range(plan.g):  # the query heads of this KV head (rows past g are padding)
            o_h = plt.load(o_ref.at[row, head, pl.ds(0, n), jnp.int32(h)], mask=ok[:, None],
                           other=0, volatile=True)                              # [splits, D]
            w_h = jnp.sum(jnp.where(at_row[None] == h, w, 0.0), axis=1)        # [splits]
            merged += jnp.where(at_row[:, None] == h, jnp.sum(w_h[:, None] * o_h, axis=0)[None], 0.0)
        _store(plan, out_ref, row, head, merged, jnp.sum(w * l_all, axis=0), real)
        count[row, head] = 0  # all of this row and head's programs have arrived: reset


def online(m, x, axis=None):
    """One online-softmax step: (new running max, factor for what was summed so far, exp(x -
    new max)), with x [rows] or [rows, n] (axis=1). A fully masked max stays -inf, factors 0."""
    m_new = jnp.maximum(m, x if axis is None else x.max(axis=axis))
    safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    return m_new, jnp.exp(m - safe), jnp.exp(x - (safe if axis is None else safe[:, None]))
