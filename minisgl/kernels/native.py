"""CPU kernels in C++ (native.cpp) for the small ops of a decode step, loaded with ctypes.

The source is compiled on first use with the system C++ compiler (`$CXX`, else g++ or c++), about a second,
into `$MINISGL_CACHE_DIR` (default ~/.cache/minisgl) under a name that hashes the source, the flags and the
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

_SOURCE = Path(__file__).with_name("native.cpp")
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
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join([cxx, *_FLAGS]).encode(), _cpu_flags().encode()]))
    cache = Path(os.environ.get("MINISGL_CACHE_DIR") or Path.home() / ".cache" / "minisgl")
    target = cache / f"native-{key.hexdigest()[:16]}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            subprocess.run([cxx, *_FLAGS, "-o", tmp, str(_SOURCE)], check=True, capture_output=True, text=True)
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
    return lib


def available() -> bool:
    return _lib() is not None


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
