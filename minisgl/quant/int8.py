"""Weight-only INT8 with one scale per output channel: w[n, k] = q[n, k] * scale[n], q in [-127, 127]."""

from __future__ import annotations

import torch
from torch import nn

from minisgl.kernels import native
from minisgl.kernels.tuning import CPU_INT8_LARGE_NATIVE_MAX_ROWS, CPU_INT8_LARGE_WEIGHT, CPU_INT8_NATIVE_MAX_ROWS
from minisgl.quant.base import QuantMethod, rows_to_device
from minisgl.quant.blocks import GROUP, Int8Blocks, QuantizedBlocks, as_dense


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scale [N] of scale_dtype) for float w [N, K], symmetric per row.

    q is rounded against the scale as stored, so the stored pair reproduces w as closely as it can."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).to(scale_dtype).clamp_min(torch.finfo(scale_dtype).tiny)
    q = torch.round(w / scale.float().unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int8_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], fp32 scale [N, K / group]) for float w [N, K], symmetric per group of columns."""
    rows, cols = w.shape
    g = w.float().view(rows, cols // group, group)
    scale = (g.abs().amax(dim=2) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(g / scale.unsqueeze(2)).clamp_(-127, 127).to(torch.int8)
    return q.view(rows, cols), scale


class Int8CudaMethod(QuantMethod):
    """`qweight` int8 [N, K] and `qscale` float32 [N], one scale per output channel, for the Triton W8A16 kernels
    (kernels/quant_matmul.py); GGUF's Q8_0 blocks are requantized to it."""

    name = "int8"

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int) -> None:
        layer.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=self.device))
        layer.register_buffer("qscale", torch.empty(out_features, dtype=torch.float32, device=self.device))

    def load_rows(self, layer: nn.Module, start: int, weight: torch.Tensor | QuantizedBlocks) -> None:
        q, scale = quantize_int8(rows_to_device(as_dense(weight), self.device), torch.float32)
        layer.qweight[start : start + q.shape[0]].copy_(q)
        layer.qscale[start : start + q.shape[0]].copy_(scale)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        from minisgl.kernels.quant_matmul import w8a16_linear

        return w8a16_linear(x, layer.qweight, layer.qscale)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return layer.qweight.float() * layer.qscale.float().unsqueeze(1)


class Int8CpuMethod(QuantMethod):
    """`qweight` int8 [N, K] and `qscale` fp32 [N, K / g], a scale per group of g = 32 columns (16 where K is not
    a multiple of 32): GGUF's Q8_0 blocks load as they are (the file's scales, exact), dense weights are quantized
    per group. Up to CPU_INT8_NATIVE_MAX_ROWS rows (more for a vocabulary-sized weight) the native kernel (AVX2 or
    AVX-512, fp32 or bf16 activations) multiplies; larger inputs, or no native kernels, expand the weight for a
    dense matmul. Layers whose K is not a multiple of 16 stay dense. With int8_activations (QuantConfig) and
    groups of 32 the native kernel rounds the activations to int8 per group of 32 first, and in fp32 it takes
    every input, so a row's result does not depend on how many rows share the call.
    """

    name = "int8"

    def __init__(self, device: torch.device, dtype: torch.dtype, int8_activations: bool = False):
        super().__init__(device, dtype)
        self.int8_activations = int8_activations

    def supports(self, out_features: int, in_features: int) -> bool:
        return in_features % 16 == 0

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int) -> None:
        groups = in_features // _cpu_group(in_features)
        layer.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        layer.register_buffer("qscale", torch.empty(out_features, groups, dtype=torch.float32))
        layer.int8_exact = True  # every row loaded holds the checkpoint's values exactly (Q8_0 blocks)

    def load_rows(self, layer: nn.Module, start: int, weight: torch.Tensor | QuantizedBlocks) -> None:
        group = layer.qweight.shape[1] // layer.qscale.shape[1]
        if isinstance(weight, Int8Blocks) and group == GROUP:
            q, scale = weight.q, weight.scale.float()  # Q8_0: the file's codes and scales
        else:
            q, scale = quantize_int8_groups(as_dense(weight), group)
            layer.int8_exact = False
        layer.qweight[start : start + q.shape[0]].copy_(q)
        layer.qscale[start : start + q.shape[0]].copy_(scale)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        rows, weight = x.shape[0], layer.qweight.numel()
        limit = CPU_INT8_LARGE_NATIVE_MAX_ROWS if weight >= CPU_INT8_LARGE_WEIGHT else CPU_INT8_NATIVE_MAX_ROWS
        act_q8 = self.int8_activations and layer.qweight.shape[1] // layer.qscale.shape[1] % GROUP == 0
        if (rows <= limit or (act_q8 and x.dtype == torch.float32)) and native.fits(x):
            return native.int8_gemm(x.contiguous(), layer.qweight, layer.qscale, act_q8)
        return torch.nn.functional.linear(x, self.dequantize(layer).to(x.dtype))

    def dequantize(self, layer: nn.Module, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The dense fp32 weight, or only its `rows` (indices); q * scale is exact in fp32."""
        q, scale = layer.qweight, layer.qscale
        if rows is not None:
            q, scale = q[rows], scale[rows]
        n, cols = q.shape
        return (q.view(n, scale.shape[1], -1).float() * scale.unsqueeze(2)).view(n, cols)


def _cpu_group(in_features: int) -> int:
    return GROUP if in_features % GROUP == 0 else 16
