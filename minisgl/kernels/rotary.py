"""Rotary position embedding applied in place to q and k (HF's rotate-half layout, partial rotary).

Layouts: q [T, num_q_heads, head_dim] and k [T, num_kv_heads, head_dim] (any token/head strides, contiguous
last dim), rotated in place; positions [T] int64; cos and sin tables [max_positions, >= rotary_dim // 2] float32
whose row p starts with cos/sin(p * inv_freq[j]) for pair j (the first half of the layer's repeated table).
Only the first rotary_dim dims of each head rotate, as pairs (j, j + rotary_dim // 2), in float32, rounded
once to the tensor's dtype: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(X, t, stride_t, stride_h, cos, sin, NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < NUM_HEADS) & (j < HALF)
    ptr = X + t.to(tl.int64) * stride_t + h * stride_h + j
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (x1 * cos - x2 * sin).to(X.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, (x2 * cos + x1 * sin).to(X.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    Q, K, Positions, Cos, Sin,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
    NUM_Q: tl.constexpr, NUM_K: tl.constexpr, HALF: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0)
    pos = tl.load(Positions + t).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(Cos + pos * stride_cos + j, mask=j < HALF, other=0.0)
    sin = tl.load(Sin + pos * stride_sin + j, mask=j < HALF, other=0.0)
    _rotate_heads(Q, t, stride_qt, stride_qh, cos, sin, NUM_Q, HALF, BLOCK_Q, BLOCK_HALF)
    _rotate_heads(K, t, stride_kt, stride_kh, cos, sin, NUM_K, HALF, BLOCK_K, BLOCK_HALF)


def apply_rotary_(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int
) -> None:
    """Rotate q and k in place at `positions` (see the module docstring for the layouts)."""
    num_tokens = q.shape[0]
    if num_tokens == 0:
        return
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("apply_rotary_ needs a contiguous last dim on q, k and the cos/sin tables")
    half = rotary_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        NUM_Q=q.shape[1], NUM_K=k.shape[1], HALF=half,
        BLOCK_Q=triton.next_power_of_2(q.shape[1]), BLOCK_K=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
    )
