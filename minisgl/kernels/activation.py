"""SiLU-and-mul: out = silu(gate) * up for x = [gate | up] along the last dim.

Layouts: x [T, 2 * n] (any row stride, contiguous last dim); the output is [T, n] contiguous, in x's dtype.
Rounding as the PyTorch path: silu(gate) in float32 rounded to the dtype, then the product rounded again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minisgl.kernels import pdl

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(X, Out, n, stride_x, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.begin(PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(X + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + t * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + t * stride_o + cols, (act * up).to(Out.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2n] -> [T, n] (leading dims other than one are flattened and restored)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n = shape[-1] // 2
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    if x2.shape[0] and n:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, _BLOCK))](
            x2, out, n, x2.stride(0), out.stride(0), BLOCK=_BLOCK, num_warps=4, **pdl.launch_args(x.device)
        )
    return out.view(*shape[:-1], n)
