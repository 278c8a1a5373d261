"""Safetensors without the library: the header parsed and checked here, each tensor memory-mapped
on its own.

Why not `safe_open`: its `get_tensor` copies the whole tensor, and its file-wide mmap keeps every
page it touched resident until the file is closed, so peak host memory grows to the model size.
Mapping one tensor at a time and dropping the map after use keeps it near the largest tensor.
Parsing the header ourselves also lets every defect (truncation, bad JSON, odd dtype) be named.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the data section.
"""
from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn)}
NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype_name: str  # as in the header: "BF16", "F32", ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`

    @property
    def dtype(self) -> np.dtype:
        if self.dtype_name not in DTYPES:
            raise ValueError(f"tensor {self.name!r} in {self.file} has dtype {self.dtype_name}; jaxtp "
                             f"loads floating point weights only ({', '.join(DTYPES)})")
        return DTYPES[self.dtype_name]

    def require_int32(self) -> None:
        """Raise, naming tensor and file, unless this is an int32 tensor (a packed 4-bit part, int4.py)."""
        if self.dtype_name != "I32":
            raise ValueError(f"tensor {self.name!r} in {self.file} has dtype {self.dtype_name}; packed "
                             f"4-bit tensors are I32")

    def mmap_int32(self) -> np.ndarray:
        """mmap of a packed 4-bit checkpoint's int32 tensor."""
        self.require_int32()
        return np.memmap(self.file, np.int32, "r", offset=self.offset, shape=self.shape)

    def mmap(self) -> np.ndarray:
        """A read-only memory map of just this tensor; unmapped when the last view is dropped."""
        if 0 in self.shape:
            return np.zeros(self.shape, self.dtype)
        return np.memmap(self.file, self.dtype, "r", offset=self.offset, shape=self.shape)


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and check one .safetensors header: every tensor must lie inside the file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file is shorter than the 8-byte header length")
            n = struct.unpack("<Q", raw)[0]
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size} (truncated?)")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"cannot read safetensors file {file}: {e}") from e
    data_start, out = 8 + n, {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"safetensors file {file}: malformed header entry for tensor {name!r}: "
                             f"{meta!r}") from e
        if dtype_name not in ITEMSIZE:
            raise ValueError(f"tensor {name!r} in {file} has unknown dtype {dtype_name!r} (corrupt header)")
        if end - begin != int(np.prod(shape)) * ITEMSIZE[dtype_name]:
            raise ValueError(f"tensor {name!r} in {file}: {end - begin} bytes of data for shape {shape} "
                             f"of {dtype_name} (corrupt header)")
        if data_start + end > size:
            raise ValueError(f"safetensors file {file} is truncated: tensor {name!r} ends at byte "
                             f"{data_start + end} but the file has {size} bytes")
        out[name] = TensorInfo(name, file, dtype_name, shape, data_start + begin)
    return out


def index(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo over a model dir (single file, or sharded with *.index.json)."""
    idx = path / "model.safetensors.index.json"
    if idx.is_file():
        try:
            files = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"cannot read {idx}: {e}") from e
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{idx} lists {', '.join(missing)}, which {path} does not have")
        paths = [path / f for f in files]
    else:
        paths = sorted(path.glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"{path} has no *.safetensors weights (pytorch .bin is not supported)")
    out: dict[str, TensorInfo] = {}
    for file in paths:
        for name, info in read_header(file).items():
            if name in out:
                raise ValueError(f"tensor {name!r} is in both {out[name].file} and {file}")
            out[name] = info
    return out


def write(file: Path, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, object]]) -> None:
    """Stream tensors to a .safetensors file, one at a time: (name, shape, dtype, fill) where
    fill(f) writes exactly the tensor's bytes to the open file f. For scripts and tests that
    make large checkpoints without holding them in memory."""
    tensors = list(tensors)
    header, offset = {}, 0
    for name, shape, dtype, _ in tensors:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as the library writes it
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, _, _, fill in tensors:
            start = f.tell()
            fill(f)
            if f.tell() - start != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                raise ValueError(f"fill for {name!r} wrote {f.tell() - start} bytes, expected "
                                 f"{header[name]['data_offsets'][1] - header[name]['data_offsets'][0]}")
