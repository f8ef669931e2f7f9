"""Triton kernels that convert quantized tensors on CUDA: the dense weight of a W8 (int8 or fp8, a scale per
row) or W4 (Int4Blocks: 4-bit groups of 32 with scale and zero) weight, for prefill-sized inputs that multiply
with cuBLAS (quant_matmul.py), and the per-token fp8 quantizer of the W8A8 path. Each rounds once, to the
output dtype. Under TRITON_INTERPRET=1 (the CPU tests) smaller blocks keep the interpreter quick.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minisgl.core import settings

_DEQUANT_BLOCK_N = 32


@triton.jit
def _w8_dequant(w_ptr, s_ptr, out_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (n < N)[:, None] & (k < K)[None, :]
    off = n[:, None].to(tl.int64) * K + k[None, :]
    w = tl.load(w_ptr + off, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, (w * s[:, None]).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _w4_dequant(w_ptr, s_ptr, z_ptr, out_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    j = tl.arange(0, 16)
    num_groups: tl.constexpr = K // 32
    ok = (n < N)[:, None] & (g < num_groups)[None, :]
    n64 = n.to(tl.int64)
    b = tl.load(w_ptr + n64[:, None, None] * (K // 2) + g[None, :, None] * 16 + j[None, None, :],
                mask=ok[:, :, None], other=0)  # fmt: skip
    sz_off = n64[:, None] * num_groups + g[None, :]
    s = tl.load(s_ptr + sz_off, mask=ok, other=0.0).to(tl.float32)[:, :, None]
    z = tl.load(z_ptr + sz_off, mask=ok, other=0.0).to(tl.float32)[:, :, None]
    o_ptrs = out_ptr + n64[:, None, None] * K + g[None, :, None] * 32 + j[None, None, :]
    dtype = out_ptr.dtype.element_ty
    tl.store(o_ptrs, (((b & 0xF).to(tl.float32) - 8.0) * s + z).to(dtype), mask=ok[:, :, None])
    tl.store(o_ptrs + 16, (((b >> 4).to(tl.float32) - 8.0) * s + z).to(dtype), mask=ok[:, :, None])


@triton.jit
def _fp8_rows(x_ptr, q_ptr, s_ptr, K: tl.constexpr, stride_xm, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + k0 + k, mask=k0 + k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):  # second pass: the row is in L2 now
        x = tl.load(x_row + k0 + k, mask=k0 + k < K, other=0.0).to(tl.float32)
        q = tl.clamp(x / scale, -448.0, 448.0)
        tl.store(q_ptr + row * K + k0 + k, q.to(q_ptr.dtype.element_ty), mask=k0 + k < K)


def w8_dequantize(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense [N, K] weight of int8/float8 w [N, K] with per-row scale [N], in `dtype` (rounded once)."""
    N, K = w.shape
    out = torch.empty(N, K, dtype=dtype, device=w.device)
    block_k = 64 if settings.triton_interpret() else 256
    _w8_dequant[(triton.cdiv(N, _DEQUANT_BLOCK_N), triton.cdiv(K, block_k))](
        w, scale, out, N, K, BLOCK_N=_DEQUANT_BLOCK_N, BLOCK_K=block_k, num_warps=4
    )
    return out


def w4_dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense [N, K] weight of the Int4Blocks layout, in `dtype`: (q - 8) scale + zero, rounded once."""
    N, K = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(N, K, dtype=dtype, device=packed.device)
    groups = 2 if settings.triton_interpret() else 8
    _w4_dequant[(triton.cdiv(N, _DEQUANT_BLOCK_N), triton.cdiv(K // 32, groups))](
        packed, scale, zero, out, N, K, BLOCK_N=_DEQUANT_BLOCK_N, GROUPS=groups, num_warps=4
    )
    return out


def fp8_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token fp8: (q [M, K] float8_e4m3fn, scale [M, 1] float32) with x ~= q * scale."""
    M, K = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    if M:
        block = 64 if settings.triton_interpret() else min(4096, triton.next_power_of_2(K))
        _fp8_rows[(M,)](x, q, scale, K, x.stride(0), BLOCK_K=block, num_warps=4 if block <= 1024 else 8)
    return q, scale
