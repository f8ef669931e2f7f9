"""Weight-only INT8 with one scale per output channel: w[n, k] = q[n, k] * scale[n], q in [-127, 127]."""

from __future__ import annotations

import torch
from torch import nn

from minisgl.kernels import native
from minisgl.quant.base import CPU_DENSE_MIN_ROWS, QuantMethod, rows_to_device
from minisgl.quant.blocks import QuantizedBlocks, as_dense

NATIVE_MAX_ROWS = 8


def _native_fits(x: torch.Tensor, layer: nn.Module) -> bool:
    return x.dtype == layer.qscale.dtype and x.shape[1] <= 4096 and x.shape[1] % 16 == 0 and native.fits(x)


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scale [N] of scale_dtype) for float w [N, K], symmetric per row.

    q is rounded against the scale as stored, so the stored pair reproduces w as closely as it can."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).to(scale_dtype).clamp_min(torch.finfo(scale_dtype).tiny)
    q = torch.round(w / scale.float().unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Method(QuantMethod):
    """Buffers: `qweight` int8 [N, K], `qscale` [N] (the activations' dtype on CPU, as torch's kernel wants;
    float32 on CUDA).

    CPU: torch's packed weight-only kernel (aten._weight_int8pack_mm). It reads K in steps of 16 and returns
    garbage for other K, so such layers stay dense. Below NATIVE_MAX_ROWS rows, the native kernel (AVX2 or
    AVX-512, fp32 or bf16 activations) computes the same product;
    prefill-sized inputs expand the weight and multiply densely instead (see CPU_DENSE_MIN_ROWS).
    CUDA: the Triton W8A16 kernels.
    Pre-quantized Q8_0 blocks (one scale per 32 values) are requantized to one scale per channel.
    """

    name = "int8"

    def supports(self, out_features: int, in_features: int) -> bool:
        return self.device.type == "cuda" or in_features % 16 == 0

    def _scale_dtype(self) -> torch.dtype:
        return torch.float32 if self.device.type == "cuda" else self.dtype

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int) -> None:
        layer.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=self.device))
        layer.register_buffer("qscale", torch.empty(out_features, dtype=self._scale_dtype(), device=self.device))

    def load_rows(self, layer: nn.Module, start: int, weight: torch.Tensor | QuantizedBlocks) -> None:
        w = rows_to_device(as_dense(weight), self.device)
        q, scale = quantize_int8(w, self._scale_dtype())
        layer.qweight[start : start + q.shape[0]].copy_(q)
        layer.qscale[start : start + q.shape[0]].copy_(scale)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from minisgl.quant.triton_kernels import w8a16_linear

            return w8a16_linear(x, layer.qweight, layer.qscale)
        if x.shape[0] >= CPU_DENSE_MIN_ROWS:
            return torch.nn.functional.linear(x, layer.qweight.to(x.dtype) * layer.qscale.to(x.dtype).unsqueeze(1))
        if x.shape[0] < NATIVE_MAX_ROWS and _native_fits(x, layer):
            return native.int8_gemm(x.contiguous(), layer.qweight, layer.qscale)
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), layer.qweight, layer.qscale)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return layer.qweight.float() * layer.qscale.float().unsqueeze(1)
