"""Weight-only INT4 in groups of 32 along the input dimension, with a scale and a zero per group:
w[n, 32g + i] = (q - 8) * scale[n, g] + zero[n, g], q in [0, 15] (Int4Blocks' layout); on the CPU the same
codes with a scale and a min, w = q * scale + min (GGUF's Q4_1 form), in minisgl's own CPU layout."""

from __future__ import annotations

import logging

import torch
from torch import nn

from minisgl.kernels import native
from minisgl.kernels.tuning import CPU_INT4_NATIVE_MAX_ROWS, CPU_INT4_Q8_FP32_ALWAYS_NATIVE
from minisgl.quant.base import QuantMethod, rows_to_device
from minisgl.quant.blocks import GROUP, Int4Blocks, QuantizedBlocks, as_dense, pack_int4

log = logging.getLogger(__name__)

# minisgl's CPU int4 layout (csrc/int4.h) interleaves blocks of 64 output rows; layers are padded to a multiple.
CPU_ROW_BLOCK = 64
_CPU_PACK_BLOCKS = 16  # row blocks re-laid out at a time, bounding the temporaries


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


def quantize_int4_min(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [N, K], scale, min fp32 [N, K/32]) with w ~ q * scale + min, scale and min fp16 values: the
    CPU layout's form. q is the nearest code for the stored pair, so the error is at most scale / 2 per value."""
    rows, cols = w.shape
    g = w.float().view(rows, cols // GROUP, GROUP)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    mins = lo.to(torch.float16).float()
    scale = ((hi - mins) / 15.0).to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: q = 0 lands on min
    q = torch.round((g - mins.unsqueeze(2)) / scale.unsqueeze(2)).clamp_(0, 15).to(torch.uint8)
    return q.view(rows, cols), scale, mins


def pack_cpu(codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """minisgl's CPU int4 layout (csrc/int4.h) of codes uint8 [N, K] with fp32 scale/min [N, K/32]:
    (qweight uint8 [Np/64, K, 32], scale_min fp16 [Np/64, K/32, 2, 64]), rows padded to Np (a multiple of 64)
    with zero weights. In block b, byte j of input k holds row 64b + j in its low nibble, 64b + 32 + j in its
    high one."""
    rows, cols = codes.shape
    blocks = -(-rows // CPU_ROW_BLOCK)
    pad = blocks * CPU_ROW_BLOCK - rows
    if pad:
        codes = torch.cat((codes, codes.new_zeros(pad, cols)))
        scale, mins = (torch.cat((t, t.new_zeros(pad, t.shape[1]))) for t in (scale, mins))
    qweight = torch.empty(blocks, cols, CPU_ROW_BLOCK // 2, dtype=torch.uint8)
    for b0 in range(0, blocks, _CPU_PACK_BLOCKS):
        b1 = min(blocks, b0 + _CPU_PACK_BLOCKS)
        c = codes[b0 * CPU_ROW_BLOCK : b1 * CPU_ROW_BLOCK].view(b1 - b0, CPU_ROW_BLOCK, cols).transpose(1, 2)
        qweight[b0:b1] = c[..., : CPU_ROW_BLOCK // 2] | (c[..., CPU_ROW_BLOCK // 2 :] << 4)
    sm = torch.stack((scale, mins), dim=1)  # [Np, 2, G]
    scale_min = sm.view(blocks, CPU_ROW_BLOCK, 2, -1).permute(0, 3, 2, 1).to(torch.float16).contiguous()
    return qweight, scale_min


def expand_cpu(qweight: torch.Tensor, scale_min: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense [Np, K] weight of minisgl's CPU int4 layout in `dtype`, in a few whole-tensor passes:
    q * scale + min, computed in fp32 and rounded once (q * scale and min may nearly cancel)."""
    blocks, cols, _ = qweight.shape
    groups = cols // GROUP
    codes = torch.empty(blocks, cols, CPU_ROW_BLOCK, dtype=torch.uint8)
    torch.bitwise_and(qweight, 0x0F, out=codes[..., : CPU_ROW_BLOCK // 2])
    torch.bitwise_right_shift(qweight, 4, out=codes[..., CPU_ROW_BLOCK // 2 :])
    sm = scale_min.float().unsqueeze(2)  # [B, G, 1, 2, 64]
    w = torch.empty(blocks, groups, GROUP, CPU_ROW_BLOCK, dtype=torch.float32)
    torch.addcmul(sm[..., 1, :], codes.view(blocks, groups, GROUP, CPU_ROW_BLOCK).float(), sm[..., 0, :], out=w)
    return w.view(blocks, cols, CPU_ROW_BLOCK).transpose(1, 2).to(dtype).reshape(blocks * CPU_ROW_BLOCK, cols)


class Int4CudaMethod(QuantMethod):
    """Buffers `qweight` (uint8 [N, K/2]), `qscale`, `qzero` ([N, K/32], the activations' dtype) hold Int4Blocks'
    layout, which the Triton kernels (kernels/quant_matmul.py) read directly. Layers whose K is not a multiple of
    32 stay dense."""

    name = "int4"

    def supports(self, out_features: int, in_features: int) -> bool:
        return in_features % GROUP == 0

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int) -> None:
        groups, dev = in_features // GROUP, self.device
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

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        from minisgl.kernels.quant_matmul import w4a16_linear

        return w4a16_linear(x, layer.qweight, layer.qscale, layer.qzero)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return Int4Blocks(layer.qweight, layer.qscale, layer.qzero).dequantize()


class Int4CpuMethod(QuantMethod):
    """While loading, `qweight` holds Int4Blocks' nibble order and `qscale`/`qmin` ([N, K/32] fp32) the file's own
    scales and mins (GGUF's fp16 values, never rounded to the activations' dtype); finalize() converts them to
    minisgl's CPU layout (`pack_cpu`): `qweight` uint8 [Np/64, K, 32] and `qscale_min` fp16 [Np/64, K/32, 2, 64].
    No byte depends on torch's packed int4 format, whose layout varies with the CPU. apply() runs the native int4
    kernel (AVX2 or AVX-512) for decode-sized inputs, and expands the weight to a dense matmul for prefill-sized
    ones or where no native kernel loads. Layers whose K is not a multiple of 32 stay dense. With
    int8_activations (QuantConfig) the native kernel rounds the activations to int8 per group of 32 first.
    """

    name = "int4"

    def __init__(self, device: torch.device, dtype: torch.dtype, int8_activations: bool = False):
        super().__init__(device, dtype)
        self.int8_activations = int8_activations

    def supports(self, out_features: int, in_features: int) -> bool:
        return in_features % GROUP == 0

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int) -> None:
        groups = in_features // GROUP
        layer.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        layer.register_buffer("qscale", torch.empty(out_features, groups, dtype=torch.float32))
        layer.register_buffer("qmin", torch.empty(out_features, groups, dtype=torch.float32))

    def load_rows(self, layer: nn.Module, start: int, weight: torch.Tensor | QuantizedBlocks) -> None:
        if isinstance(weight, Int4Blocks):  # GGUF Q4_0/Q4_1: codes, scales and mins kept as the file has them
            packed, scale = weight.packed, weight.scale.float()
            # zero = min + 8 scale, exact in float64 (gguf_blocks): so min comes back exactly
            mins = (weight.zero.double() - 8.0 * weight.scale.double()).float()
        else:
            q, scale, mins = quantize_int4_min(rows_to_device(as_dense(weight), self.device))
            packed = pack_int4(q)
        n = packed.shape[0]
        layer.qweight[start : start + n].copy_(packed)
        layer.qscale[start : start + n].copy_(scale)
        layer.qmin[start : start + n].copy_(mins)

    def finalize(self, layer: nn.Module) -> None:
        codes = Int4Blocks(layer.qweight, layer.qscale, layer.qmin).codes()
        qweight, scale_min = pack_cpu(codes, layer.qscale, layer.qmin)
        stored = scale_min.float()
        if not (torch.isfinite(stored).all() and _exact_in_fp16(layer.qscale) and _exact_in_fp16(layer.qmin)):
            log.warning("an int4 layer's scales or mins are not fp16 values; rounded to fp16 for the CPU layout")
        del layer.qscale, layer.qmin
        layer.qweight = qweight
        layer.register_buffer("qscale_min", scale_min)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        rows = layer.out_features
        q8_fp32 = self.int8_activations and x.dtype == torch.float32 and CPU_INT4_Q8_FP32_ALWAYS_NATIVE
        if (x.shape[0] <= CPU_INT4_NATIVE_MAX_ROWS or q8_fp32) and native.fits(x):
            return native.int4_gemm(x.contiguous(), layer.qweight, layer.qscale_min, rows, self.int8_activations)
        y = torch.nn.functional.linear(x, expand_cpu(layer.qweight, layer.qscale_min, x.dtype))
        return y if y.shape[-1] == rows else y[..., :rows]

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        if not hasattr(layer, "qscale_min"):  # before finalize()
            codes = Int4Blocks(layer.qweight, layer.qscale, layer.qmin).codes().float()
            rows = codes.shape[0]
            w = codes.view(rows, -1, GROUP) * layer.qscale.unsqueeze(2) + layer.qmin.unsqueeze(2)
            return w.view(rows, -1)
        return expand_cpu(layer.qweight, layer.qscale_min, torch.float32)[: layer.out_features]


def _exact_in_fp16(t: torch.Tensor) -> bool:
    return bool((t.to(torch.float16).float() == t).all())
