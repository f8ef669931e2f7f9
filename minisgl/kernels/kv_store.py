"""Scatter of new tokens' k/v into one layer of the paged pool.

Layouts: k, v are [T, num_kv_heads, head_dim] (any token/head strides, contiguous last dim); k_cache, v_cache
are [slots, num_kv_heads, head_dim] (contiguous last dim); loc is [T] int64, token t goes to slot loc[t].
Values are cast to the cache's dtype. Slots must be distinct, except padding rows that all write the
scratch slot 0 (what they leave there is never read as a real token).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minisgl.kernels import pdl


@triton.jit
def _store_kv_kernel(
    K,
    V,
    KCache,
    VCache,
    Loc,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cks,
    stride_ckh,
    stride_cvs,
    stride_cvh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.begin(PDL)
    t = tl.program_id(0)
    slot = tl.load(Loc + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_HEADS) & (d < HEAD_DIM)
    k = tl.load(K + t * stride_kt + h * stride_kh + d, mask=mask)
    tl.store(KCache + slot * stride_cks + h * stride_ckh + d, k.to(KCache.dtype.element_ty), mask=mask)
    v = tl.load(V + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(VCache + slot * stride_cvs + h * stride_cvh + d, v.to(VCache.dtype.element_ty), mask=mask)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """k_cache[loc[t]] = k[t] and v_cache[loc[t]] = v[t] for every token t."""
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        loc,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
        **pdl.launch_args(k.device),
    )
