"""Weight-only INT4 in groups of 32 along the input dimension, with a scale and a zero per group:
w[n, 32g + i] = (q - 8) * scale[n, g] + zero[n, g], q in [0, 15] (Int4Blocks' layout)."""

from __future__ import annotations

import torch
from torch import nn

from minisgl.kernels.tuning import CPU_DENSE_MIN_ROWS
from minisgl.quant.base import QuantMethod, rows_to_device
from minisgl.quant.blocks import GROUP, Int4Blocks, QuantizedBlocks, as_dense, pack_int4

# torch's CPU int4 layout interleaves blocks of 64 output rows; layers are padded to a multiple of it.
_CPU_ROW_BLOCK = 64
_CPU_PACK_ROWS = 1024  # rows converted at a time, bounding the int32 temporary the conversion needs


def quantize_int4(w: torch.Tensor, scale_dtype: torch.dtype) -> Int4Blocks:
    """Asymmetric min/max quantization of float w [N, K] (K a multiple of 32) into Int4Blocks.

    scale and zero are rounded to scale_dtype (the precision they will be stored in) before q is chosen, so q is
    the nearest code for the stored pair; the error is then at most half a step, scale / 2, per value."""
    rows, cols = w.shape
    g = w.float().view(rows, cols // GROUP, GROUP)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    # A constant group gets a scale for which q = 0 lands exactly on its value (zero is then 0 or 2 * value).
    flat = torch.where(lo != 0, lo.abs() / 8.0, torch.ones_like(lo))
    scale = torch.where(hi > lo, (hi - lo) / 15.0, flat).to(scale_dtype).float()
    scale = scale.clamp_min(torch.finfo(scale_dtype).tiny)  # a range below the dtype's precision must not give 0
    zero = (lo + 8.0 * scale).to(scale_dtype).float()
    q = torch.round((g - zero.unsqueeze(2)) / scale.unsqueeze(2) + 8.0).clamp_(0, 15)
    return Int4Blocks(pack_int4(q.view(rows, cols)), scale, zero)


class Int4Method(QuantMethod):
    """While loading, buffers `qweight` (uint8 [N, K/2]), `qscale`, `qzero` ([N, K/32], the activations' dtype)
    hold Int4Blocks' layout, which the CUDA Triton kernels read directly.

    On CPU, finalize() converts to torch's packed layout for aten._weight_int4pack_mm_for_cpu: `qweight` becomes
    uint8 [Np, K/2] (rows padded to a multiple of 64 with zero weights), `qscale_zero` [K/32, Np, 2] replaces
    qscale/qzero. Layers whose K is not a multiple of 32 stay dense.
    """

    name = "int4"

    def supports(self, out_features: int, in_features: int) -> bool:
        return in_features % GROUP == 0

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int) -> None:
        groups = in_features // GROUP
        dev = self.device
        layer.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=dev))
        layer.register_buffer("qscale", torch.empty(out_features, groups, dtype=self.dtype, device=dev))
        layer.register_buffer("qzero", torch.empty(out_features, groups, dtype=self.dtype, device=dev))

    def load_rows(self, layer: nn.Module, start: int, weight: torch.Tensor | QuantizedBlocks) -> None:
        if isinstance(weight, Int4Blocks):  # GGUF Q4_0/Q4_1: the codes are kept as they are
            blocks = weight
        else:
            blocks = quantize_int4(rows_to_device(as_dense(weight), self.device), self.dtype)
        n = blocks.packed.shape[0]
        layer.qweight[start : start + n].copy_(blocks.packed)
        layer.qscale[start : start + n].copy_(blocks.scale)
        layer.qzero[start : start + n].copy_(blocks.zero)

    def finalize(self, layer: nn.Module) -> None:
        if self.device.type != "cpu" or hasattr(layer, "qscale_zero"):
            return
        blocks = Int4Blocks(layer.qweight, layer.qscale, layer.qzero)
        rows = blocks.shape[0]
        padded = -(-rows // _CPU_ROW_BLOCK) * _CPU_ROW_BLOCK
        packed = []
        for start in range(0, padded, _CPU_PACK_ROWS):
            n = min(_CPU_PACK_ROWS, padded - start)
            real = max(0, min(n, rows - start))
            codes = blocks.narrow(0, start, real).codes().to(torch.int32)
            if real < n:  # padding rows: q = 8 with a zero of 0 -> w = 0
                codes = torch.cat((codes, torch.full((n - real, blocks.shape[1]), 8, dtype=torch.int32)))
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        scale_zero = torch.zeros(blocks.scale.shape[1], padded, 2, dtype=self.dtype)
        scale_zero[:, :rows, 0] = layer.qscale.t()
        scale_zero[:, :rows, 1] = layer.qzero.t()
        del layer.qscale, layer.qzero
        layer.qweight = torch.cat(packed)
        layer.register_buffer("qscale_zero", scale_zero)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from minisgl.kernels.quant_matmul import w4a16_linear

            return w4a16_linear(x, layer.qweight, layer.qscale, layer.qzero)
        if x.shape[0] >= CPU_DENSE_MIN_ROWS:
            y = torch.nn.functional.linear(x, _expand_cpu(layer.qweight, layer.qscale_zero, x.dtype))
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.contiguous(), layer.qweight, GROUP, layer.qscale_zero
            )
        rows = layer.out_features
        return y if y.shape[-1] == rows else y[..., :rows]

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        if not hasattr(layer, "qscale_zero"):
            return Int4Blocks(layer.qweight, layer.qscale, layer.qzero).dequantize()
        rows = layer.out_features
        sz = layer.qscale_zero.float()
        blocks_of_64 = layer.qweight.view(-1, sz.shape[0] * GROUP, _CPU_ROW_BLOCK // 2)  # [Np/64, K, 32]
        # Byte j of a 64-row block holds row j in its low nibble and row 32 + j in its high one, for each k.
        codes = torch.cat((blocks_of_64 & 0x0F, blocks_of_64 >> 4), dim=2).permute(0, 2, 1).reshape(-1, sz.shape[0], GROUP)
        w = (codes.float() - 8.0) * sz[..., 0].t().unsqueeze(2) + sz[..., 1].t().unsqueeze(2)
        return w.reshape(codes.shape[0], -1)[:rows]


def _expand_cpu(qweight: torch.Tensor, scale_zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense [Np, K] weight of torch's packed CPU layout, in `dtype`: `dequantize` done in a few whole-tensor
    passes. Byte j of a 64-row block holds row j in its low nibble and row 32 + j in its high one, for each k."""
    groups, padded = scale_zero.shape[0], scale_zero.shape[1]
    blocks = padded // _CPU_ROW_BLOCK
    packed = qweight.view(blocks, groups * GROUP, _CPU_ROW_BLOCK // 2)
    codes = torch.empty(blocks, groups * GROUP, _CPU_ROW_BLOCK, dtype=torch.uint8)
    torch.bitwise_and(packed, 0x0F, out=codes[..., : _CPU_ROW_BLOCK // 2])
    torch.bitwise_right_shift(packed, 4, out=codes[..., _CPU_ROW_BLOCK // 2 :])
    sz = scale_zero.to(dtype).view(groups, blocks, _CPU_ROW_BLOCK, 2).permute(1, 0, 3, 2)  # [blocks, G, 2, 64]
    scale, zero = sz[:, :, 0:1], sz[:, :, 1:2]  # [blocks, G, 1, 64]
    w = torch.empty(blocks, groups, GROUP, _CPU_ROW_BLOCK, dtype=dtype)
    torch.addcmul(zero - 8.0 * scale, codes.view(blocks, groups, GROUP, _CPU_ROW_BLOCK).to(dtype), scale, out=w)
    return w.view(blocks, groups * GROUP, _CPU_ROW_BLOCK).transpose(1, 2).reshape(padded, groups * GROUP)
