"""The GGUF header: metadata and tensor table, read without decoding the vocabulary.

It is parsed here rather than with `gguf.GGUFReader` because that reader builds a Python object per vocabulary
string (~2 s for a 49k vocabulary); we only need the scalars and the tensor table. The file itself is
memory-mapped, so a tensor's bytes are read only when asked for.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class SkippedStrings:
    """Stands in for a metadata array of strings (vocabularies, merges) that the header parser does not decode."""

    length: int


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table. `shape` is in torch order (GGUF lists the fastest-varying dim first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """Metadata key/values and tensor table of a GGUF file."""

    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]


class _Cursor:
    """Little-endian reads from a bytes-like buffer at a moving position."""

    def __init__(self, buf: memoryview | bytes):
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            return self.array()
        return self.unpack(_SCALAR_FORMATS[GGUFValueType(vtype)])

    def array(self) -> Any:
        etype, n = self.unpack("<I"), self.unpack("<Q")
        if etype == GGUFValueType.STRING:
            for _ in range(n):  # only the lengths are needed to step over them
                self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
            return SkippedStrings(n)
        if etype == GGUFValueType.ARRAY:
            return [self.array() for _ in range(n)]
        dtype = np.dtype(_SCALAR_FORMATS[GGUFValueType(etype)].replace("?", "b1"))
        out = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()
        self.pos += n * dtype.itemsize
        return out.tolist()


def is_gguf(path: str) -> bool:
    """True when `path` is a regular file starting with the GGUF magic bytes."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == _MAGIC


def read_gguf_header(path: str) -> GGUFHeader:
    """Parse the metadata and tensor table of a GGUF file (cached per path, size and mtime)."""
    st = os.stat(path)
    return _read_header(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=4)
def _read_header(path: str, size: int, mtime_ns: int) -> GGUFHeader:
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mm))
    if bytes(cur.buf[:4]) != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file")
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        # Versions are tiny numbers; anything else means a big-endian file or the 32-bit-count GGUFv1.
        raise ValueError(f"{path}: unsupported GGUF version {version} (only little-endian v2/v3 are read)")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I"))
    raw = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
        raw.append((name, dims, GGMLQuantizationType(cur.unpack("<I")), cur.unpack("<Q")))
    align = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // align) * align
    tensors = {}
    for name, dims, qtype, offset in raw:
        block, type_size = GGML_QUANT_SIZES[qtype]
        nbytes = math.prod(dims) // block * type_size
        tensors[name] = GGUFTensorInfo(name, tuple(reversed(dims)), qtype, data_start + offset, nbytes)
    return GGUFHeader(metadata, tensors)


def tensor_bytes(path: str, info: GGUFTensorInfo) -> np.ndarray:
    """The raw bytes of one tensor, memory-mapped."""
    # Copy-on-write mapping: torch wants writable arrays, and nothing written through it reaches the file.
    return np.memmap(path, dtype=np.uint8, mode="c", offset=info.offset, shape=(info.nbytes,))
