"""CPU kernels in C++ (csrc/) for a decode step, loaded with ctypes: its small ops, an int4 matmul, and a whole
Llama-family decoder layer.

The sources are compiled on first use with the system C++ compiler (`$CXX`, else g++ or c++), about a second,
into `$MINISGL_CACHE_DIR` (default ~/.cache/minisgl) under a name that hashes the sources, the flags and the
CPU's feature flags, so a copied cache never runs code built for another CPU. Without a compiler, or with
`MINISGL_NATIVE=0`, `available()` is False and callers keep their torch ops.

The wrappers expect CPU tensors of one dtype, float32 or bfloat16, whose last dim is contiguous; `fits()`
checks that. They return results in the layouts the torch paths do.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCES = Path(__file__).with_name("csrc")  # api.cpp includes the headers beside it
# Reassociation lets the compiler vectorise the fp32 reductions; no -ffast-math, so NaN and inf keep meaning.
# -fopenmp: the library needs libgomp.so.1, which resolves to the copy torch has already loaded, so its parallel
# loops run on torch's own threads.
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
          "-fno-signed-zeros", "-shared", "-fPIC"]  # fmt: skip
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}

_i64, _f32, _ptr, _int = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "minisgl_rmsnorm": [_int, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _f32],
    "minisgl_add_rmsnorm": [_int, _ptr, _ptr, _ptr, _i64, _i64, _f32],
    "minisgl_rotary": [_int, _ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _i64],
    "minisgl_silu_and_mul": [_int, _ptr, _ptr, _i64, _i64],
    "minisgl_decode_attention": [_int, _ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr,
                                 _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _f32],  # fmt: skip
    "minisgl_int4_gemm": [_ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _ptr],
    "minisgl_int8_gemm": [_ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr],
    "minisgl_has_avx512": [],
    "minisgl_decoder_layer": [_ptr, _ptr, _ptr, _ptr, _int],
}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(cxx: str) -> Path:
    sources = [f.read_bytes() for f in sorted(_SOURCES.iterdir()) if f.suffix in (".h", ".cpp")]
    key = hashlib.sha256(b"\0".join([*sources, " ".join([cxx, *_FLAGS]).encode(), _cpu_flags().encode()]))
    cache = Path(os.environ.get("MINISGL_CACHE_DIR") or Path.home() / ".cache" / "minisgl")
    target = cache / f"native-{key.hexdigest()[:16]}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            cmd = [cxx, *_FLAGS, "-o", tmp, str(_SOURCES / "api.cpp")]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            os.replace(tmp, target)  # atomic: processes building at once each install a whole library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


@functools.cache
def _lib() -> ctypes.CDLL | None:
    if os.environ.get("MINISGL_NATIVE", "1") == "0":
        return None
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        log.warning("no C++ compiler found: CPU decode uses torch ops (slower)")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cxx)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("building the native CPU kernels failed, using torch ops instead: %s", detail[-2000:])
        return None
    for name, args in _SIGNATURES.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    lib.minisgl_has_avx512.restype = _int
    lib.avx512 = bool(lib.minisgl_has_avx512())  # asked once: int8 layers check it on every call
    return lib


def available() -> bool:
    return _lib() is not None


def has_avx512() -> bool:
    """Whether the library has the AVX-512 kernels: int4_gemm, int8_gemm and decoder_layer (it is compiled for
    the CPU it runs on)."""
    lib = _lib()
    return lib is not None and lib.avx512


def fits(*tensors: torch.Tensor) -> bool:
    """True when the native kernels can take these tensors: the library built, all on the CPU, one dtype that it
    supports, each with a contiguous last dim. (Called per op per layer: kept to plain attribute reads.)"""
    dtype = tensors[0].dtype
    if dtype not in _DTYPES or _lib() is None:
        return False
    for t in tensors:
        if not t.is_cpu or t.dtype != dtype or t.stride(-1) != 1:
            return False
    return True


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x into a new contiguous tensor (x's rows may be evenly strided)."""
    dim = x.shape[-1]
    rows = x if x.dim() == 2 else x.reshape(-1, dim)  # a view unless the rows are unevenly strided
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _lib().minisgl_rmsnorm(_DTYPES[x.dtype], rows.data_ptr(), rows.stride(0), weight.data_ptr(), out.data_ptr(), dim,
                           rows.shape[0], dim, eps)  # fmt: skip
    return out


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x, then x = rmsnorm(residual); in place on both (contiguous [T, D]). Returns (x, residual)."""
    rows, dim = x.shape
    _lib().minisgl_add_rmsnorm(_DTYPES[x.dtype], x.data_ptr(), residual.data_ptr(), weight.data_ptr(), rows, dim, eps)
    return x, residual


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x [T, H, D] in place (heads contiguous within a token; the token stride is free) by cos/sin
    [T, half] (contiguous)."""
    rows, heads, head_dim = x.shape
    _lib().minisgl_rotary(_DTYPES[x.dtype], x.data_ptr(), x.stride(0), heads, head_dim, cos.data_ptr(),
                          sin.data_ptr(), cos.shape[-1], rows)  # fmt: skip


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] (contiguous) = [gate | up]; returns silu(gate) * up, [T, I]."""
    rows, inter = x.shape[0], x.shape[1] // 2
    out = x.new_empty((rows, inter))
    _lib().minisgl_silu_and_mul(_DTYPES[x.dtype], x.data_ptr(), out.data_ptr(), rows, inter)
    return out


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out_loc: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Store k/v [B, Hkv, D] at slots out_loc [B] of the caches [S, Hkv, D], then attend: q [B, Hq, D] over the
    slots [B, L] (int64; the first lens[b] of row b are real) of its sequence. q, k and v may be strided views of
    one projection (any token and head strides). Returns [B, Hq, D]."""
    batch, q_heads, head_dim = q.shape
    out = q.new_empty((batch, q_heads, head_dim))
    _lib().minisgl_decode_attention(
        _DTYPES[q.dtype], q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
        v.data_ptr(), v.stride(0), v.stride(1), out_loc.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        slots.data_ptr(), lens.data_ptr(), out.data_ptr(), batch, slots.shape[1], q_heads, k.shape[1], head_dim,
        scale,
    )  # fmt: skip
    return out


def int8_gemm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16, contiguous; K a multiple of 16, at most 4096) times int8 qweight [N, K] with per-row scale
    [N] (bf16): the product aten._weight_int8pack_mm computes, [M, N]."""
    rows, k_len = x.shape
    y = x.new_empty((rows, qweight.shape[0]))
    _lib().minisgl_int8_gemm(x.data_ptr(), rows, k_len, qweight.data_ptr(), scale.data_ptr(), qweight.shape[0],
                             y.data_ptr())  # fmt: skip
    return y


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, scale_zero: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [M, K] (bf16, contiguous) times an int4 weight in torch's packed CPU layout (qweight uint8 [Np, K/2],
    scale_zero bf16 [K/32, Np, 2]): the product aten._weight_int4pack_mm_for_cpu computes, [M, out_features]."""
    rows, k_len = x.shape
    y = x.new_empty((rows, out_features))
    _lib().minisgl_int4_gemm(x.data_ptr(), rows, k_len, qweight.data_ptr(), scale_zero.data_ptr(), out_features,
                             scale_zero.shape[1], y.data_ptr())  # fmt: skip
    return y


class Int4Weight(ctypes.Structure):
    """An int4 linear in torch's packed CPU layout (quant/int4.py), as csrc/decoder.h reads it."""

    _fields_ = [("packed", _ptr), ("scale_zero", _ptr), ("rows", _i64), ("padded_rows", _i64), ("k", _i64)]


class DecoderWeights(ctypes.Structure):
    """One decoder layer's weights and KV cache, as csrc/decoder.h reads them. It holds raw pointers: the
    tensors they point into must outlive it."""

    _fields_ = [
        ("input_norm", _ptr), ("post_norm", _ptr),
        ("qkv", Int4Weight), ("o", Int4Weight), ("gate_up", Int4Weight), ("down", Int4Weight),
        ("k_cache", _ptr), ("v_cache", _ptr),
        ("hidden", _i64), ("q_heads", _i64), ("kv_heads", _i64), ("head_dim", _i64), ("inter", _i64),
        ("rotary_half", _i64),
        ("eps", ctypes.c_double), ("scale", ctypes.c_double),
    ]  # fmt: skip


class DecodeStep(ctypes.Structure):
    """What a decode step gives every layer: cos/sin [B, half] (bf16), out_loc [B], slots [B, L], lens [B]
    (int64, see attention/cpu_backend.py)."""

    _fields_ = [("cos", _ptr), ("sin", _ptr), ("out_loc", _ptr), ("slots", _ptr), ("lens", _ptr),
                ("batch", _i64), ("max_len", _i64)]  # fmt: skip


def decoder_layer(weights: DecoderWeights, step: DecodeStep, h: torch.Tensor, residual: torch.Tensor, first: bool):
    """Run one decoder layer's decode step in place: h [B, hidden] (bf16, contiguous) in, the layer's MLP output
    out; residual updated (with first, only written: the first layer has none yet)."""
    _lib().minisgl_decoder_layer(ctypes.byref(weights), ctypes.byref(step), h.data_ptr(), residual.data_ptr(), first)
