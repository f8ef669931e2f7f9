"""Normalisation layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minisgl.kernels import native


class RMSNorm(nn.Module):
    """RMSNorm as one fused op. It accumulates in float32 like HF. For half-precision inputs the native CPU
    kernel rounds where HF does (before and after the weight multiply); the Triton kernel and the torch
    fallback round once, after it, which is within that dtype's tolerance."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def load(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        self.weight.data.copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from minisgl.kernels.norm import rmsnorm

            return rmsnorm(x, self.weight, self.eps)
        if native.fits(x, self.weight):
            return native.rmsnorm(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def forward_with_residual(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (norm(x + residual), x + residual): the pre-norm decoder's add-then-normalise step."""
        if x.is_cuda:  # one fused kernel, in place: the results live in x's and residual's memory
            from minisgl.kernels.norm import fused_add_rmsnorm

            return fused_add_rmsnorm(x, residual, self.weight, self.eps)
        if native.fits(x, residual, self.weight) and x.is_contiguous() and residual.is_contiguous():
            return native.fused_add_rmsnorm(x, residual, self.weight, self.eps)  # in place, like the CUDA kernel
        residual = x + residual
        return self.forward(residual), residual


class LayerNorm(nn.Module):
    """LayerNorm with bias, computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(dim), requires_grad=False)

    def load(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        (self.weight if name.endswith("weight") else self.bias).data.copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(), self.eps).to(x.dtype)
