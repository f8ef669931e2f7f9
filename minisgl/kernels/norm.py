"""RMSNorm and fused residual-add + RMSNorm over the last dim, with the rounding of the PyTorch path.

Layouts: x is [rows, hidden] or [tokens, heads, hidden] (any leading strides, contiguous last dim); weight is
[hidden]. Math, as `minisgl.layers.norm.RMSNorm` (torch's fused rms_norm): y = x * rsqrt(mean(x^2) + eps) * weight
in float32, rounded once to the result dtype. With a residual, r = x + residual is rounded to the
dtype first and normalised; both results are written in place (x <- norm(r), residual <- r).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minisgl.kernels import pdl


@triton.jit
def _rmsnorm_kernel(
    X,
    Residual,
    W,
    Out,
    heads,
    hidden,
    eps,
    stride_x0,
    stride_x1,
    stride_r0,
    stride_o0,
    stride_o1,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.begin(PDL)
    row = tl.program_id(0)
    i0 = row // heads
    i1 = row % heads
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x_ptr = X + i0.to(tl.int64) * stride_x0 + i1 * stride_x1 + cols
    x = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r_ptr = Residual + i0.to(tl.int64) * stride_r0 + cols
        summed = (x + tl.load(r_ptr, mask=mask, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        tl.store(r_ptr, summed, mask=mask)
        x = summed.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    o_ptr = Out + i0.to(tl.int64) * stride_o0 + i1 * stride_o1 + cols
    tl.store(o_ptr, (x * inv * w).to(Out.dtype.element_ty), mask=mask)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(1) if x.dim() == 2 else x


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor, eps: float
) -> None:
    x3, o3 = _as_3d(x), _as_3d(out)
    rows = x3.shape[0] * x3.shape[1]
    if rows == 0:
        return
    hidden = x3.shape[2]
    block = triton.next_power_of_2(hidden)
    _rmsnorm_kernel[(rows,)](
        x3,
        residual,
        weight,
        o3,
        x3.shape[1],
        hidden,
        eps,
        x3.stride(0),
        x3.stride(1),
        residual.stride(0) if residual is not None else 0,
        o3.stride(0),
        o3.stride(1),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        **pdl.launch_args(x.device),
        num_warps=min(16, max(1, block // 256)),
    )


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rmsnorm(x) as a new contiguous tensor of x's shape (dtype: x's promoted with weight's)."""
    shape = x.shape
    if x.dim() not in (2, 3) or x.stride(-1) != 1:
        x = x.reshape(-1, shape[-1]).contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _launch(x, None, weight, out, eps)
    return out.view(shape)


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: residual <- x + residual, x <- weight * rmsnorm(residual); returns (x, residual).

    x and residual are [rows, hidden] with a contiguous last dim and the same dtype.
    """
    if x.dim() != 2 or x.stride(-1) != 1 or residual.stride(-1) != 1 or x.dtype != residual.dtype:
        raise ValueError("fused_add_rmsnorm needs 2-D x and residual of one dtype with contiguous rows")
    out = x if weight.dtype == x.dtype else torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))
    _launch(x, residual, weight, out, eps)
    return out, residual
