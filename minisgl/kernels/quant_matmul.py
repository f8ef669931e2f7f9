"""Triton kernels for quantized linears on CUDA: W8A16 (int8 or fp8 weights, one scale per output channel) and
W4A16 (4-bit groups of 32 along K with scale and zero, Int4Blocks' layout).

Decode at batch 1..GEMV_MAX_M is a memory-bound GEMV: each program streams a few weight rows once and reduces
with FMAs (tensor cores would sit idle), and the W4 GEMV applies each group's scale and zero to the group's
partial sum instead of to every weight. Up to W4/W8_DEQUANT_MIN_M rows a tl.dot GEMM dequantizes weight tiles
in registers; from there (prefill) the layer's weight is dequantized into a temporary (quant_convert.py) and
cuBLAS multiplies.
Every launch is CUDA-graph capturable: no host sync, output allocated from shapes alone.

Configs are autotuned per (N, K) and M bucket on first use; the engine's first forwards (CUDA-graph warm-up)
happen before capture, so no tuning runs inside a graph. Under TRITON_INTERPRET=1 (the CPU tests) small fixed
configs are used instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minisgl.core import settings
from minisgl.kernels import pdl
from minisgl.kernels.quant_convert import w4_dequantize, w8_dequantize
from minisgl.kernels.tuning import GEMV_MAX_M, W4_DEQUANT_MIN_M, W8_DEQUANT_MIN_M


@triton.jit
def _w8_gemv(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K: tl.constexpr, stride_xm, stride_ym,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    EVEN_K: tl.constexpr = K % BLOCK_K == 0
    pid = tl.program_id(0)
    m = pid % M  # the M programs of one row block run together, so its weights come from L2 after the first
    n = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + n[:, None].to(tl.int64) * K + k[None, :]
    x_ptrs = x_ptr + m * stride_xm + k
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    pdl.begin(PDL)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
            x = tl.load(x_ptrs)
        else:
            k_ok = k0 + k < K
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=k_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _nibble_float(moved, P: tl.constexpr, USE_ASM: tl.constexpr):
    """The 4 bits at P..P+3 of `moved` (P in 11, 15, 19) as the float 2^(23-P) + q: q OR-ed into the mantissa of
    2^(23-P), so no int-to-float conversion. P + 3 <= 22 keeps q off the exponent; P >= 11 keeps the
    2^(23-P) term small enough that a float32 sum carrying it still resolves x * q to ~2^-12 of its size."""
    if USE_ASM:
        # ptxas makes `(a & MASK) | EXP` two LOP3s (one immediate each); one lop3 with (a & b) | c does it.
        if P == 11:
            bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x7800, 0x45800000, 0xEA;", "=r,r", [moved],
                                             dtype=tl.int32, is_pure=True, pack=1)  # fmt: skip
        elif P == 15:
            bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x78000, 0x43800000, 0xEA;", "=r,r", [moved],
                                             dtype=tl.int32, is_pure=True, pack=1)  # fmt: skip
        else:
            bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x780000, 0x41800000, 0xEA;", "=r,r", [moved],
                                             dtype=tl.int32, is_pure=True, pack=1)  # fmt: skip
    else:
        bits = (moved & (0xF << P)) | ((150 - P) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _w4_gemv(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K: tl.constexpr, stride_xm, stride_ym,
             BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, USE_ASM: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    # w_ptr is the packed weight read as int32 words, 4 per group. Byte i of word w of group g holds columns
    # 32g + 4w + i (low nibble) and 32g + 16 + 4w + i (high nibble), so nibble t of a word is column
    # 32g + 16 (t % 2) + 4w + t // 2. The words of a row are contiguous: threads split a block's words and each
    # holds BLOCK_N rows of them, so its activations are loaded and summed once for BLOCK_N rows.
    EVEN_G: tl.constexpr = (K // 32) % GROUPS == 0
    pid = tl.program_id(0)
    m = pid % M  # the M programs of one row block run together, so its weights come from L2 after the first
    n = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    j = tl.arange(0, GROUPS * 4)
    g = tl.arange(0, GROUPS)
    num_groups: tl.constexpr = K // 32
    n64 = n.to(tl.int64)
    w_ptrs = w_ptr + n64[:, None] * (K // 8) + j[None, :]
    sz_off = n64[:, None] * num_groups + g[None, :]
    x_ptrs = x_ptr + m * stride_xm + (j // 4) * 32 + (j % 4) * 4
    acc = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    # Loading the first weights before this wait measured slower (more live registers), so only the launch
    # overlaps the kernel before.
    pdl.begin(PDL)
    for g0 in range(0, num_groups, GROUPS):
        if EVEN_G:
            x_ok = j >= 0
            word = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
            s = tl.load(s_ptr + sz_off, mask=n_ok[:, None], other=0.0).to(tl.float32)
            z = tl.load(z_ptr + sz_off, mask=n_ok[:, None], other=0.0).to(tl.float32)
        else:
            x_ok = g0 + j // 4 < num_groups
            word = tl.load(w_ptrs, mask=n_ok[:, None] & x_ok[None, :], other=0)
            sz_ok = n_ok[:, None] & (g0 + g < num_groups)[None, :]
            s = tl.load(s_ptr + sz_off, mask=sz_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + sz_off, mask=sz_ok, other=0.0).to(tl.float32)
        # Per word, sum_t x_t f_t with f_t = 2^(23-P_t) + q_t: one shift per three nibbles, one lop3 and one
        # FMA per nibble. `bias` collects the sum_t x_t 2^(23-P_t) to take back out once per group.
        d = tl.zeros([BLOCK_N, GROUPS * 4], dtype=tl.float32)
        x_sum = tl.zeros([GROUPS * 4], dtype=tl.float32)
        bias = tl.zeros([GROUPS * 4], dtype=tl.float32)
        for t in tl.static_range(8):
            p = 11 + 4 * (t % 3)
            shift = p - 4 * t
            moved = word << shift if shift >= 0 else word >> -shift  # high bits of >> are masked off
            xv = tl.load(x_ptrs + (16 * (t % 2) + t // 2), mask=x_ok, other=0.0).to(tl.float32)
            d += _nibble_float(moved, p, USE_ASM) * xv[None, :]
            x_sum += xv
            bias += xv * (1 << (23 - p))
        xs = tl.sum(tl.reshape(x_sum, (GROUPS, 4)), axis=1)[None, :]
        xq = tl.sum(tl.reshape(d, (BLOCK_N, GROUPS, 4)), axis=2) - tl.sum(tl.reshape(bias, (GROUPS, 4)), axis=1)
        # sum_k x_k ((q_k - 8) s + z) = s (sum_k x_k q_k - 8 sum_k x_k) + z sum_k x_k, per group.
        acc += s * (xq - 8.0 * xs) + z * xs
        w_ptrs += GROUPS * 4
        x_ptrs += GROUPS * 32
        sz_off += GROUPS
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + m * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row blocks sweep the columns together, so each weight tile is read from HBM once.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    width = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _w8_gemm(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K: tl.constexpr, stride_xm, stride_ym,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    EVEN_K: tl.constexpr = K % BLOCK_K == 0
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = m < M, n < N
    x_ptrs = x_ptr + m[:, None].to(tl.int64) * stride_xm + k[None, :]
    w_ptrs = w_ptr + n[None, :].to(tl.int64) * K + k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = k0 + k < K
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x, w.to(x.dtype), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc *= tl.load(s_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + m[:, None].to(tl.int64) * stride_ym + n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _w4_gemm(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K: tl.constexpr, stride_xm, stride_ym,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    EVEN_G: tl.constexpr = (K // 32) % GROUPS == 0
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.arange(0, GROUPS)
    j = tl.arange(0, 16)
    m_ok, n_ok = m < M, n < N
    num_groups: tl.constexpr = K // 32
    n64 = n.to(tl.int64)
    # The weight tile is read k-major, [GROUPS, 16, BLOCK_N], as tl.dot wants its right operand.
    w_ptrs = w_ptr + n64[None, None, :] * (K // 2) + g[:, None, None] * 16 + j[None, :, None]
    sz_off = n64[None, :] * num_groups + g[:, None]
    x_ptrs = x_ptr + m[:, None, None].to(tl.int64) * stride_xm + g[None, :, None] * 32 + j[None, None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g0 in range(0, num_groups, GROUPS):
        if EVEN_G:
            b = tl.load(w_ptrs, mask=n_ok[None, None, :], other=0)
            s = tl.load(s_ptr + sz_off, mask=n_ok[None, :], other=0.0).to(tl.float32)
            z = tl.load(z_ptr + sz_off, mask=n_ok[None, :], other=0.0).to(tl.float32)
            x_lo = tl.load(x_ptrs, mask=m_ok[:, None, None], other=0.0)
            x_hi = tl.load(x_ptrs + 16, mask=m_ok[:, None, None], other=0.0)
        else:
            g_ok = g0 + g < num_groups
            b = tl.load(w_ptrs, mask=n_ok[None, None, :] & g_ok[:, None, None], other=0)
            sz_ok = n_ok[None, :] & g_ok[:, None]
            s = tl.load(s_ptr + sz_off, mask=sz_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + sz_off, mask=sz_ok, other=0.0).to(tl.float32)
            x_ok = m_ok[:, None, None] & g_ok[None, :, None]
            x_lo = tl.load(x_ptrs, mask=x_ok, other=0.0)
            x_hi = tl.load(x_ptrs + 16, mask=x_ok, other=0.0)
        s3 = s[:, None, :]
        z3 = (z - 8.0 * s)[:, None, :]
        w_lo = ((b & 0xF).to(tl.float32) * s3 + z3).to(x_lo.dtype)
        w_hi = ((b >> 4).to(tl.float32) * s3 + z3).to(x_lo.dtype)
        acc = tl.dot(tl.reshape(x_lo, (BLOCK_M, GROUPS * 16)), tl.reshape(w_lo, (GROUPS * 16, BLOCK_N)), acc)
        acc = tl.dot(tl.reshape(x_hi, (BLOCK_M, GROUPS * 16)), tl.reshape(w_hi, (GROUPS * 16, BLOCK_N)), acc)
        w_ptrs += GROUPS * 16
        x_ptrs += GROUPS * 32
        sz_off += GROUPS
    y_ptrs = y_ptr + m[:, None].to(tl.int64) * stride_ym + n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---- configs and launchers ----


def _cfg(num_warps: int, num_stages: int, **meta: int) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


_GEMV_W8_CONFIGS = [
    _cfg(4, 3, BLOCK_N=4, BLOCK_K=1024),
    _cfg(4, 3, BLOCK_N=8, BLOCK_K=512),
    _cfg(4, 3, BLOCK_N=16, BLOCK_K=256),
    _cfg(8, 3, BLOCK_N=8, BLOCK_K=1024),
    _cfg(8, 3, BLOCK_N=16, BLOCK_K=512),
    _cfg(4, 4, BLOCK_N=2, BLOCK_K=2048),
]
_GEMV_W4_CONFIGS = [  # threads split GROUPS * 4 words 4 at a time; the rest of a warp goes along the rows
    # The winners of a 54-config sweep on Llama-8B's shapes (H100): qkv, o, gate_up, down in that order.
    _cfg(4, 3, BLOCK_N=16, GROUPS=64),
    _cfg(8, 3, BLOCK_N=16, GROUPS=128),
    _cfg(4, 2, BLOCK_N=32, GROUPS=32),
    _cfg(8, 2, BLOCK_N=16, GROUPS=64),
    _cfg(4, 2, BLOCK_N=16, GROUPS=64),
    _cfg(4, 2, BLOCK_N=16, GROUPS=32),
    _cfg(4, 2, BLOCK_N=8, GROUPS=64),
    _cfg(2, 2, BLOCK_N=16, GROUPS=32),
    _cfg(1, 2, BLOCK_N=8, GROUPS=32),
]
# GEMM configs per M bucket (the smallest power of two >= M, 16 at least, 128 at most).
_GEMM_TILES = {
    16: [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 64, 4, 5)],
    32: [(32, 64, 128, 4, 4), (32, 128, 128, 4, 4), (32, 128, 64, 4, 4)],
    64: [(64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 128, 128, 8, 3)],
    128: [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 128, 8, 3)],
}


def _gemm_configs(k_meta: str, k_div: int) -> dict[int, list[triton.Config]]:
    return {
        bucket: [_cfg(w, s, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, **{k_meta: bk // k_div}) for bm, bn, bk, w, s in tiles]
        for bucket, tiles in _GEMM_TILES.items()
    }


_KEY = ["N", "K"]


# GEMVs are timed as CUDA-graph replays, as decode runs them: a plain launch from Python costs as much as the
# kernel, and made the choice a coin toss. (Tuning with the weights out of L2, benchmark/cold.py, was no
# faster end to end: docs/benchmarks.md.)
def _bench_in_graph(kernel_call, quantiles):
    return triton.testing.do_bench_cudagraph(kernel_call, quantiles=quantiles)


_w8_gemv_tuned = triton.autotune(_GEMV_W8_CONFIGS, key=_KEY, do_bench=_bench_in_graph)(_w8_gemv)
_w4_gemv_tuned = triton.autotune(_GEMV_W4_CONFIGS, key=_KEY, do_bench=_bench_in_graph)(_w4_gemv)
_w8_gemm_tuned = {b: triton.autotune(c, key=_KEY)(_w8_gemm) for b, c in _gemm_configs("BLOCK_K", 1).items()}
_w4_gemm_tuned = {b: triton.autotune(c, key=_KEY)(_w4_gemm) for b, c in _gemm_configs("GROUPS", 32).items()}

# Fixed configs for the interpreter: small tiles keep numpy fast, several loop iterations still run.
_INTERPRET = {
    "w8_gemv": dict(BLOCK_N=8, BLOCK_K=32, PDL=False),
    "w4_gemv": dict(BLOCK_N=8, GROUPS=2, USE_ASM=False, PDL=False),
    "w8_gemm": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2),
    "w4_gemm": dict(BLOCK_M=16, BLOCK_N=32, GROUPS=2, GROUP_M=2),
}


def _interpreting() -> bool:
    return settings.triton_interpret()


def _bucket(m: int) -> int:
    return min(128, max(16, triton.next_power_of_2(m)))


def _launch(name: str, kernel, tuned, grid, args: tuple, **compiled: object) -> None:
    """`compiled`: constexprs for the compiled kernel only (the interpreter's come with its config)."""
    if _interpreting():
        meta = _INTERPRET[name]
        kernel[grid(meta)](*args, **meta)
    else:
        tuned[grid](*args, **compiled)


def _prepare(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x, torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)


def w8a16_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16/fp16) times int8 or float8 w [N, K] with per-row scale [N]: y [M, N] in x's dtype."""
    M, K = x.shape
    N = w.shape[0]
    if M >= W8_DEQUANT_MIN_M:
        return torch.nn.functional.linear(x, w8_dequantize(w, scale, x.dtype))
    x, y = _prepare(x, N)
    if M == 0:
        return y
    args = (x, w, scale, y, M, N, K, x.stride(0), y.stride(0))
    if M <= GEMV_MAX_M:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * M,)  # noqa: E731
        _launch("w8_gemv", _w8_gemv, _w8_gemv_tuned, grid, args, **pdl.launch_args(x.device))
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _launch("w8_gemm", _w8_gemm, _w8_gemm_tuned[_bucket(M)], grid, args)
    return y


def w4a16_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x [M, K] times the Int4Blocks weight (packed [N, K/2] uint8, scale/zero [N, K/32]): y [M, N]."""
    M, K = x.shape
    N = packed.shape[0]
    if M >= W4_DEQUANT_MIN_M:
        return torch.nn.functional.linear(x, w4_dequantize(packed, scale, zero, x.dtype))
    x, y = _prepare(x, N)
    if M == 0:
        return y
    if M <= GEMV_MAX_M:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * M,)  # noqa: E731
        words = packed.view(torch.int32)  # whole groups are 16 bytes, so rows are whole words
        args = (x, words, scale, zero, y, M, N, K, x.stride(0), y.stride(0))
        _launch("w4_gemv", _w4_gemv, _w4_gemv_tuned, grid, args, USE_ASM=True, **pdl.launch_args(x.device))
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        args = (x, packed, scale, zero, y, M, N, K, x.stride(0), y.stride(0))
        _launch("w4_gemm", _w4_gemm, _w4_gemm_tuned[_bucket(M)], grid, args)
    return y
