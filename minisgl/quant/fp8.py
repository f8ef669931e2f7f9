"""FP8 (e4m3) weights with one scale per output channel; activations quantized per token at run time."""

from __future__ import annotations

import torch
from torch import nn

from minisgl.kernels.tuning import FP8_WEIGHT_ONLY_MAX_M
from minisgl.quant.base import QuantMethod, rows_to_device
from minisgl.quant.blocks import QuantizedBlocks, as_dense

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [N, K], scale float32 [N]) with w ~= q * scale, per row."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(1e-12)
    return (w / scale.unsqueeze(1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token fp8 of activations in plain torch: (q [M, K], scale [M, 1] float32), as the Triton kernel."""
    x = x.float()
    scale = (x.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    return (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor cores: compute capability 8.9 (Ada) or newer, e.g. H100/H200."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Method(QuantMethod):
    """Buffers: `qweight` float8_e4m3fn [N, K], `qscale` float32 [N].

    CUDA, M > FP8_WEIGHT_ONLY_MAX_M: each token's activations get their own fp8 scale (Triton kernel), then
    torch._scaled_mm multiplies with row-wise scales and writes bf16/fp16. Small M: the Triton W8A16 kernels
    read the fp8 weight directly, activations stay in 16 bits. Elsewhere (CPU, for tests) the same arithmetic
    as the large-M path is emulated in float32. _scaled_mm needs N and K to be multiples of 16.
    """

    name = "fp8"

    def supports(self, out_features: int, in_features: int) -> bool:
        return out_features % 16 == 0 and in_features % 16 == 0

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int) -> None:
        layer.register_buffer("qweight", torch.empty(out_features, in_features, dtype=FP8, device=self.device))
        layer.register_buffer("qscale", torch.empty(out_features, dtype=torch.float32, device=self.device))

    def load_rows(self, layer: nn.Module, start: int, weight: torch.Tensor | QuantizedBlocks) -> None:
        q, scale = quantize_fp8(rows_to_device(as_dense(weight), self.device))
        layer.qweight[start : start + q.shape[0]].copy_(q)
        layer.qscale[start : start + q.shape[0]].copy_(scale)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            return self.apply_emulated(layer, x)
        from minisgl.kernels.quant_convert import fp8_quantize_rows
        from minisgl.kernels.quant_matmul import w8a16_linear

        if x.shape[0] <= FP8_WEIGHT_ONLY_MAX_M:
            return w8a16_linear(x, layer.qweight, layer.qscale)
        xq, x_scale = fp8_quantize_rows(x)
        w_scale = layer.qscale.view(1, -1)
        return torch._scaled_mm(xq, layer.qweight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype)

    def apply_emulated(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The large-M arithmetic in float32 torch: quantized activations times quantized weights."""
        xq, x_scale = quantize_rows_reference(x)
        return ((xq.float() * x_scale) @ self.dequantize(layer).t()).to(x.dtype)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return layer.qweight.float() * layer.qscale.unsqueeze(1)
