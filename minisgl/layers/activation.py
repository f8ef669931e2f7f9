"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minisgl.kernels import native


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim; returns silu(gate) * up."""
    if x.is_cuda:
        from minisgl.kernels.activation import silu_and_mul as fused

        return fused(x)
    if x.dim() == 2 and x.is_contiguous() and native.fits(x):
        return native.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
