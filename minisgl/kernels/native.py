"""CPU kernels in C++ (csrc/) for a decode step, loaded with ctypes: its small ops, int4 and int8 matmuls, and a
whole Llama-family decoder layer.

The sources are compiled when the package is built (kernels/build.py), one shared library per ISA level: `avx2`
(x86-64-v3: AVX2, FMA, F16C) and `avx512` (x86-64-v4 with AVX512-BF16 and VNNI). At first use the best level the
CPU reports is loaded; `MINISGL_CPU_ISA=avx2|avx512|none` forces a lower one (`none`, or `MINISGL_NATIVE=0`: no
native kernels). Where no library fits (ARM, an x86 CPU below v3, a build without a compiler) `available()` is
False and callers keep their torch ops; a log line says so. Nothing is compiled at run time.

The wrappers expect CPU tensors of one dtype, float32 or bfloat16, whose last dim is contiguous; `fits()`
checks that (KV caches may also hold fp16: `fits_kv_cache()`). They return results in the layouts the torch paths
do. A wrapper handed what its kernel cannot take raises ValueError instead of returning an unwritten output.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from minisgl.core import settings
from minisgl.kernels.build import LEVEL_FLAGS, library_name

log = logging.getLogger(__name__)

LEVELS = tuple(LEVEL_FLAGS)  # lowest first
_LEVEL_CODES = {"avx2": 1, "avx512": 2}
# What /proc/cpuinfo must list for a level's library to run: its -march level's features (x86-64-v3: AVX2, BMI1/2,
# F16C, FMA, LZCNT (abm), MOVBE; v4 adds AVX-512 F/BW/CD/DQ/VL) plus the extensions it is compiled with.
_REQUIRED_FLAGS = {
    "avx2": {"avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe"},
    "avx512": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_bf16", "avx512_vnni"},
}
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}

_i64, _f32, _ptr, _int = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "minisgl_rmsnorm": [_int, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _f32],
    "minisgl_add_rmsnorm": [_int, _ptr, _ptr, _ptr, _i64, _i64, _f32],
    "minisgl_rotary": [_int, _ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _i64],
    "minisgl_silu_and_mul": [_int, _ptr, _ptr, _i64, _i64],
    "minisgl_decode_attention": [
        _int,
        _int,
        _ptr,
        _i64,
        _i64,
        _ptr,
        _i64,
        _i64,
        _ptr,
        _i64,
        _i64,
        _ptr,
        _ptr,
        _ptr,
        _ptr,
        _ptr,
        _ptr,
        _i64,
        _i64,
        _i64,
        _i64,
        _i64,
        _f32,
    ],  # fmt: skip
    "minisgl_int4_gemm": [_int, _ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, _int],
    "minisgl_int8_gemm": [_int, _ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _ptr, _int],
    "minisgl_decoder_layer": [_ptr, _ptr, _ptr, _ptr, _int],
    "minisgl_gumbel_argmax": [_ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr],
}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cpu_level() -> str:
    """The best level this CPU can run: 'avx512', 'avx2' or 'none'."""
    flags = cpu_flags()
    best = "none"
    for level in LEVELS:
        if _REQUIRED_FLAGS[level] <= flags:
            best = level
    return best


def has_native_bf16() -> bool:
    """Whether the CPU computes with bf16 natively (AVX512-BF16 or AMX) and the kernel level is not forced below
    AVX-512 (a forced level stands for a CPU without it); elsewhere bf16 math is emulated through fp32 at extra
    cost, so CPU activations default to fp32 (models.config.resolve_dtype)."""
    flags = cpu_flags()
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and requested_level()[0] == "avx512"


def requested_level() -> tuple[str, str]:
    """(level, why): the CPU's best level, lowered by MINISGL_CPU_ISA or MINISGL_NATIVE=0."""
    best = cpu_level()
    if not settings.native_kernels():
        return "none", "MINISGL_NATIVE=0"
    forced = settings.cpu_isa()
    if not forced:
        return best, f"the best level this CPU reports ({best})"
    if forced not in ("none", *LEVELS):
        raise ValueError(f"MINISGL_CPU_ISA={forced!r}: expected one of none, {', '.join(LEVELS)}")
    if forced != "none" and (best == "none" or LEVELS.index(forced) > LEVELS.index(best)):
        log.warning("MINISGL_CPU_ISA=%s is above what this CPU reports (%s); using %s", forced, best, best)
        return best, f"the CPU's best ({best}); MINISGL_CPU_ISA={forced} is above it"
    return forced, f"MINISGL_CPU_ISA={forced}"


class Int4Weight(ctypes.Structure):
    """An int4 linear in minisgl's CPU layout (quant/int4.py, csrc/int4.h), as csrc/decoder.h reads it."""

    _fields_ = [("packed", _ptr), ("sm", _ptr), ("rows", _i64), ("k", _i64), ("act_q8", _i64)]


class DecoderWeights(ctypes.Structure):
    """One decoder layer's weights and KV cache, as csrc/decoder.h reads them (is_bf16: the activations' dtype;
    kv_f16: fp16 caches, else the activations' dtype). It holds raw pointers: the tensors they point into must
    outlive it."""

    _fields_ = [
        ("input_norm", _ptr), ("post_norm", _ptr),
        ("qkv", Int4Weight), ("o", Int4Weight), ("gate_up", Int4Weight), ("down", Int4Weight),
        ("k_cache", _ptr), ("v_cache", _ptr),
        ("hidden", _i64), ("q_heads", _i64), ("kv_heads", _i64), ("head_dim", _i64), ("inter", _i64),
        ("rotary_half", _i64), ("is_bf16", _i64), ("kv_f16", _i64),
        ("eps", ctypes.c_double), ("scale", ctypes.c_double),
    ]  # fmt: skip


class DecodeStep(ctypes.Structure):
    """What a decode step gives every layer: cos/sin [B, half] (the activations' dtype), out_loc [B], slots
    [B, L], lens [B] (int64, see attention/cpu_backend.py)."""

    _fields_ = [("cos", _ptr), ("sin", _ptr), ("out_loc", _ptr), ("slots", _ptr), ("lens", _ptr),
                ("batch", _i64), ("max_len", _i64)]  # fmt: skip


_STRUCTS = (Int4Weight, DecoderWeights, DecodeStep)  # minisgl_sizeof's numbering


def _open(level: str) -> ctypes.CDLL:
    path = Path(__file__).with_name(library_name(level))
    lib = ctypes.CDLL(str(path))
    lib.minisgl_isa.restype = _int
    lib.minisgl_isa.argtypes = []
    if lib.minisgl_isa() != _LEVEL_CODES[level]:
        raise OSError(f"{path.name} reports ISA level {lib.minisgl_isa()}, not {level}'s")
    lib.minisgl_sizeof.restype = _i64
    lib.minisgl_sizeof.argtypes = [_int]
    for i, struct in enumerate(_STRUCTS):
        if lib.minisgl_sizeof(i) != ctypes.sizeof(struct):
            raise OSError(f"{path.name}: sizeof {struct.__name__} is {lib.minisgl_sizeof(i)} in C, "
                          f"{ctypes.sizeof(struct)} here: csrc/decoder.h and native.py disagree")  # fmt: skip
    for name, args in _SIGNATURES.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    lib.level = level
    return lib


@functools.cache
def _lib() -> ctypes.CDLL | None:
    level, why = requested_level()
    while level != "none":
        try:
            lib = _open(level)
        except OSError as e:
            log.warning("native CPU kernels (%s) could not load: %s", level, e)
            below = LEVELS.index(level) - 1
            level, why = (LEVELS[below] if below >= 0 else "none"), f"the {level} library did not load"
            continue
        log.info("native CPU kernels: %s, chosen as %s", level, why)
        return lib
    log.warning("no native CPU kernels (%s): CPU decode uses torch ops", why)
    return None


def available() -> bool:
    return _lib() is not None


def level() -> str:
    """The ISA level of the loaded kernels: 'avx512', 'avx2', or 'none'."""
    lib = _lib()
    return lib.level if lib is not None else "none"


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"native CPU kernel: {what}")


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


def fits_kv_cache(dtype: torch.dtype, cache: torch.Tensor) -> bool:
    """True when decode attention can run natively with activations of `dtype` over this cache [S, Hkv, D]: the
    cache holds that dtype or fp16, on the CPU, contiguous heads of a size that is a multiple of 8."""
    return (
        dtype in _DTYPES
        and _lib() is not None
        and cache.is_cpu
        and cache.dtype in (dtype, torch.float16)
        and cache.shape[-1] % 8 == 0
        and cache.stride(-1) == 1
    )


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


def gumbel_argmax(scaled: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """engine/draws.py's seeded Gumbel-max draw, `(scaled + gumbel_noise(seeds, steps, V)).argmax(-1)`, in
    one pass that computes the noise only for tokens that can still win (csrc/gumbel.h). scaled: float32
    [B, V] with a contiguous last dim; seeds, steps: int64 [B]. Returns int64 [B]."""
    rows, vocab = scaled.shape
    _check(scaled.dtype == torch.float32 and scaled.stride(-1) == 1, "gumbel_argmax takes float32 rows")
    seeds, steps = seeds.contiguous(), steps.contiguous()
    _check(seeds.dtype == steps.dtype == torch.int64 and seeds.shape == steps.shape == (rows,),
           "gumbel_argmax: seeds and steps must be int64 [B]")  # fmt: skip
    out = torch.empty(rows, dtype=torch.int64)
    _lib().minisgl_gumbel_argmax(scaled.data_ptr(), rows, vocab, scaled.stride(0), seeds.data_ptr(), steps.data_ptr(),
                                 out.data_ptr())  # fmt: skip
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
    one projection (any token and head strides). The caches hold q's dtype or fp16 (k/v are rounded to it as
    they are stored). Returns [B, Hq, D]."""
    batch, q_heads, head_dim = q.shape
    kv_f16 = k_cache.dtype == torch.float16
    _check(v_cache.dtype == k_cache.dtype and (kv_f16 or k_cache.dtype == q.dtype),
           f"decode_attention: caches of {k_cache.dtype} with {q.dtype} activations")  # fmt: skip
    _check(head_dim % 8 == 0, f"decode_attention: head_dim {head_dim} is not a multiple of 8")
    out = q.new_empty((batch, q_heads, head_dim))
    _lib().minisgl_decode_attention(
        _DTYPES[q.dtype], int(kv_f16), q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
        v.data_ptr(), v.stride(0), v.stride(1), out_loc.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        slots.data_ptr(), lens.data_ptr(), out.data_ptr(), batch, slots.shape[1], q_heads, k.shape[1], head_dim,
        scale,
    )  # fmt: skip
    return out


def int8_gemm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, act_q8: bool = False) -> torch.Tensor:
    """x [M, K] (fp32 or bf16, contiguous) times int8 qweight [N, K] with fp32 scales [N, G], each for K/G
    consecutive columns (a multiple of 16: G = K/32 for GGUF's Q8_0, 1 per channel), [M, N] in x's dtype.
    act_q8: x is first rounded to int8 per group of 32 (csrc/int8_q8.h; K/G a multiple of 32), else multiplied
    in fp32 (csrc/int8.h)."""
    rows, k_len = x.shape
    _check(x.dtype in _DTYPES, f"int8_gemm takes fp32 or bf16 activations, not {x.dtype}")
    _check(qweight.dtype == torch.int8 and qweight.shape[1] == k_len, "int8_gemm: qweight must be int8 [N, K]")
    _check(scale.dtype == torch.float32 and scale.dim() == 2 and scale.shape[0] == qweight.shape[0]
           and k_len % scale.shape[1] == 0 and (k_len // scale.shape[1]) % 16 == 0,
           "int8_gemm: scale must be fp32 [N, G] with K/G a multiple of 16")  # fmt: skip
    _check(not act_q8 or (k_len // scale.shape[1]) % 32 == 0, "int8_gemm: act_q8 needs groups of 32 columns")
    _check(x.is_contiguous() and qweight.is_contiguous() and scale.is_contiguous(), "int8_gemm: contiguous inputs")
    y = x.new_empty((rows, qweight.shape[0]))
    _lib().minisgl_int8_gemm(_DTYPES[x.dtype], x.data_ptr(), rows, k_len, qweight.data_ptr(), scale.data_ptr(),
                             scale.shape[1], qweight.shape[0], y.data_ptr(), int(act_q8))  # fmt: skip
    return y


def int4_gemm(
    x: torch.Tensor, qweight: torch.Tensor, scale_min: torch.Tensor, out_features: int, act_q8: bool = False
) -> torch.Tensor:
    """x [M, K] (fp32 or bf16, contiguous) times an int4 weight in minisgl's CPU layout (quant/int4.py: qweight
    uint8 [Np/64, K, 32], scale_min fp16 [Np/64, K/32, 2, 64]), [M, out_features]. act_q8: x is first rounded
    to int8 per group of 32 (csrc/int4_q8.h), else multiplied in fp32 (csrc/int4.h)."""
    rows, k_len = x.shape
    _check(x.dtype in _DTYPES, f"int4_gemm takes fp32 or bf16 activations, not {x.dtype}")
    _check(
        qweight.dtype == torch.uint8 and qweight.dim() == 3 and qweight.shape[1:] == (k_len, 32),
        f"int4_gemm: qweight must be uint8 [Np/64, {k_len}, 32], not {qweight.dtype} {list(qweight.shape)}",
    )
    _check(
        scale_min.dtype == torch.float16 and scale_min.shape == (qweight.shape[0], k_len // 32, 2, 64),
        "int4_gemm: scale_min must be fp16 [Np/64, K/32, 2, 64]",
    )
    _check(k_len % 32 == 0 and 0 < out_features <= qweight.shape[0] * 64, "int4_gemm: K % 32 and the row count")
    _check(x.is_contiguous() and qweight.is_contiguous() and scale_min.is_contiguous(), "int4_gemm: contiguous inputs")
    y = x.new_empty((rows, out_features))
    _lib().minisgl_int4_gemm(_DTYPES[x.dtype], x.data_ptr(), rows, k_len, qweight.data_ptr(), scale_min.data_ptr(),
                             out_features, y.data_ptr(), int(act_q8))  # fmt: skip
    return y


def decoder_layer(weights: DecoderWeights, step: DecodeStep, h: torch.Tensor, residual: torch.Tensor, first: bool):
    """Run one decoder layer's decode step in place: h [B, hidden] (contiguous, the layer's dtype) in, the layer's
    MLP output out; residual updated (with first, only written: the first layer has none yet). The caller
    (engine/cpu_runner.py) has checked the weights when it built them; here only h and residual."""
    _check(
        h.dtype == residual.dtype == (torch.bfloat16 if weights.is_bf16 else torch.float32),
        "decoder_layer: h and residual in the layer's dtype",
    )
    _check(
        h.is_contiguous() and residual.is_contiguous() and h.shape == residual.shape == (step.batch, weights.hidden),
        "decoder_layer: h and residual contiguous [batch, hidden]",
    )
    _lib().minisgl_decoder_layer(ctypes.byref(weights), ctypes.byref(step), h.data_ptr(), residual.data_ptr(), first)
