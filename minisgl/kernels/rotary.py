"""Rotary position embedding applied in place (HF's rotate-half layout, partial rotary).

Layouts: x is [T, ..., head_dim] with at most two head dims between (q or k of [T, heads, D], GPT-NeoX's
[T, heads, 2, D] view of its fused qkv), any strides but a contiguous last dim; cos and sin are the step's
rows [T, half] (any row stride, contiguous last dim), looked up once per forward by RotaryEmbedding.lookup.
Only the first 2 * half dims of each head rotate, as pairs (j, j + half), in float32, rounded once to x's
dtype: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minisgl.kernels import pdl


@triton.jit
def _rotary_kernel(
    X,
    Cos,
    Sin,
    stride_t,
    stride_a,
    stride_b,
    stride_cos,
    stride_sin,
    HEADS_B: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.begin(PDL)
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)[None, :]
    h = tl.arange(0, BLOCK_H)[:, None]
    cos = tl.load(Cos + t * stride_cos + j, mask=j < HALF, other=0.0).to(tl.float32)
    sin = tl.load(Sin + t * stride_sin + j, mask=j < HALF, other=0.0).to(tl.float32)
    # One program per token rotates all its heads: the cos/sin row is loaded once.
    mask = (h < NUM_HEADS) & (j < HALF)
    ptr = X + t * stride_t + (h // HEADS_B) * stride_a + (h % HEADS_B) * stride_b + j
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (x1 * cos - x2 * sin).to(X.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, (x2 * cos + x1 * sin).to(X.dtype.element_ty), mask=mask)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x in place by the per-token cos/sin rows (see the module docstring for the layouts)."""
    if x.dim() not in (3, 4):
        raise ValueError(f"rotary_ needs x of shape [T, heads, D] or [T, heads, n, D], got {tuple(x.shape)}")
    if x.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("rotary_ needs a contiguous last dim on x and the cos/sin rows")
    num_tokens, half = x.shape[0], cos.shape[-1]
    if num_tokens == 0:
        return
    x4 = x.unsqueeze(2) if x.dim() == 3 else x
    heads = x4.shape[1] * x4.shape[2]
    _rotary_kernel[(num_tokens,)](
        x4,
        cos,
        sin,
        x4.stride(0),
        x4.stride(1),
        x4.stride(2),
        cos.stride(0),
        sin.stride(0),
        HEADS_B=x4.shape[2],
        NUM_HEADS=heads,
        HALF=half,
        BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
        **pdl.launch_args(x.device),
    )
