"""Reading 4-bit AWQ and GPTQ checkpoints: each projection's packed int32 `qweight` and `qzeros`
and fp16 `scales` (GPTQ: and `g_idx`) unpacked on the host into the [out, in] float32 weight they
stand for, which loading.py then reads as any other weight (and quantize.py stores in 8 bits).

GPTQ (AutoGPTQ / GPTQModel, checkpoint_format "gptq"): qweight [in/8, out], input rows 8i..8i+7
in one int32, row 8i+j in bits 4j; qzeros [groups, out/8], packed the same way along the outputs,
holding zero - 1 ("gptq_v2": the zero itself); scales [groups, out]; g_idx [in], each input's
group (in order unless desc_act). AWQ (AutoAWQ "gemm"): qweight [in, out/8], columns 8c..8c+7 in
one int32 in the order 0 2 4 6 1 3 5 7; qzeros [groups, out/8] likewise; scales [groups, out].
Both: w = (q - zero) * scale.
"""
from __future__ import annotations

import numpy as np

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a packed int32 holds column AWQ_ORDER[i]
_SHIFTS = np.arange(0, 32, 4, dtype=np.uint32)


def scheme(q: dict) -> tuple[str, int, int]:
    """(kind, group_size, zero offset) of an "awq" / "gptq" quantization_config; other layouts
    are refused by name."""
    kind, bits = q["quant_method"], q.get("bits", q.get("w_bit"))
    if bits != 4:
        raise ValueError(f"{kind} checkpoints with bits={bits} are not supported (4 bits only)")
    group = q.get("group_size", q.get("q_group_size", 128))
    if kind == "awq":
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm" or not q.get("zero_point", True):
            raise ValueError(f"awq version {version!r} (zero_point={q.get('zero_point', True)}) is not "
                             f"supported (the 'gemm' layout with zero points)")
        return "awq", group, 0
    fmt = q.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"gptq checkpoint_format {fmt!r} is not supported ('gptq' or 'gptq_v2')")
    return "gptq", group, 1 if fmt == "gptq" else 0


def parts(kind: str) -> tuple[str, ...]:
    return ("qweight", "qzeros", "scales", "g_idx") if kind == "gptq" else ("qweight", "qzeros", "scales")


def shapes(kind: str, group: int, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
    """The shape each part of an [out, in] weight must have."""
    groups = -(-in_features // (group if group > 0 else in_features))
    packed = (in_features // 8, out_features) if kind == "gptq" else (in_features, out_features // 8)
    out = {"qweight": packed, "qzeros": (groups, out_features // 8), "scales": (groups, out_features)}
    return {**out, "g_idx": (in_features,)} if kind == "gptq" else out


def dense(arrays: dict[str, np.ndarray], kind: str, group: int, offset: int) -> np.ndarray:
    """The float32 [out, in] weight of one projection's parts (`arrays`, by part name)."""
    scale = np.asarray(arrays["scales"], np.float32)
    if kind == "gptq":
        q, zero = _unpack_rows(arrays["qweight"]), _unpack_cols(arrays["qzeros"]) + offset
    else:
        q, zero = _unpack_cols(arrays["qweight"], AWQ_ORDER), _unpack_cols(arrays["qzeros"], AWQ_ORDER)
    g = arrays.get("g_idx")
    g = np.arange(q.shape[0]) // (group if group > 0 else q.shape[0]) if g is None else np.asarray(g)
    return np.ascontiguousarray(((q - zero[g]) * scale[g]).T)


def _unpack_rows(packed: np.ndarray) -> np.ndarray:
    """int32 [r, c] -> float32 [8r, c]: row 8i+j from bits 4j of row i."""
    nibbles = (np.asarray(packed).view(np.uint32)[:, None, :] >> _SHIFTS[None, :, None]) & 0xF
    return nibbles.reshape(-1, packed.shape[1]).astype(np.float32)


def _unpack_cols(packed: np.ndarray, order: tuple[int, ...] = tuple(range(8))) -> np.ndarray:
    """int32 [r, c] -> float32 [r, 8c]: column 8k+order[i] from bits 4i of column k."""
    nibbles = (np.asarray(packed).view(np.uint32)[:, :, None] >> _SHIFTS[None, None, :]) & 0xF
    return nibbles[:, :, np.argsort(order)].reshape(packed.shape[0], -1).astype(np.float32)
