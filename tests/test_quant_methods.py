"""Quantization methods one layer at a time: quantize->dequantize error bounds against the original float weights,
the packed CPU kernels against a float32 matmul with the dequantized weights, and GGUF blocks against gguf's own
dequantizer. The Triton kernels have their own module (test_quant_triton.py)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_gguf import random_blocks

from minisgl.layers.linear import Linear
from minisgl.quant import QuantConfig, make_method
from minisgl.quant.blocks import Int4Blocks, Int8Blocks, pack_int4
from minisgl.quant.fp8 import quantize_fp8
from minisgl.quant.gguf_blocks import gguf_blocks
from minisgl.quant.int4 import quantize_int4
from minisgl.quant.int8 import quantize_int8

CPU = torch.device("cpu")
BATCHES = [1, 2, 3, 7, 16, 33, 64, 200]  # 200: prefill-sized, where the CPU layers expand the weight
BF16_EPS = 2.0**-8  # relative rounding of one bfloat16 value


def quantized_linear(
    scheme: str, n: int, k: int, dtype=torch.bfloat16, bias: bool = False
) -> tuple[Linear, torch.Tensor]:
    """A Linear quantized with `scheme` from a random float32 weight (returned too), finalized for its kernel."""
    torch.manual_seed(n * 1000 + k)
    w = torch.randn(n, k) * 0.05
    w[0] *= 20  # rows of very different ranges, so one scale per row (or group) matters
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as the engine builds models: the bias in the activations' dtype
    try:
        layer = Linear(k, n, bias=bias, quant=QuantConfig(scheme))
        method = make_method(scheme, CPU, dtype)
        assert method.supports(n, k)
        layer.create_weights(method)
    finally:
        torch.set_default_dtype(prev)
    layer.write_rows(0, w[: n // 3])  # rows arrive in pieces, as fused shards do
    layer.write_rows(n // 3, w[n // 3 :])
    if bias:
        layer.bias.data.copy_(torch.randn(n))
    layer.finalize()
    return layer, w


def assert_matmul_close(y: torch.Tensor, x: torch.Tensor, w_deq: torch.Tensor, bias: torch.Tensor | None = None):
    """y equals x @ w_deq^T (+ bias) up to rounding the output and the products' partial sums to bfloat16."""
    ref = x.double() @ w_deq.double().t()
    bound = (x.double().abs() @ w_deq.double().abs().t()) * 2 * BF16_EPS + 1e-6
    if bias is not None:
        ref, bound = ref + bias.double(), bound + bias.double().abs() * BF16_EPS
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("scheme,n,k", [
    ("int8", 100, 96), ("int8", 7, 48), ("int8", 64, 256), ("int4", 100, 96), ("int4", 37, 160),
    ("int4", 192, 64), ("int4", 64, 256), ("int4", 1100, 64),  # the last is packed for the CPU in two pieces
])  # fmt: skip
def test_cpu_kernel_matches_dequantized_matmul(scheme, n, k):
    layer, w = quantized_linear(scheme, n, k, bias=True)
    w_deq = layer.method.dequantize(layer)
    assert w_deq.shape == (n, k)
    # Still the original weight after the kernel's re-layout (a misplaced row or group would be off by O(1)).
    assert (w_deq - w).norm() / w.norm() < {"int8": 0.01, "int4": 0.1}[scheme]
    for m in BATCHES:
        x = torch.randn(m, k).to(torch.bfloat16)
        y = layer(x)
        assert y.shape == (m, n) and y.dtype == torch.bfloat16
        assert_matmul_close(y.float(), x.float(), w_deq, layer.bias.float())


def test_cpu_kernels_in_float32():
    # fp32 models quantized on CPU use the same kernels with fp32 activations; errors are then fp32-sized.
    for scheme in ("int8", "int4"):
        layer, _ = quantized_linear(scheme, 64, 128, dtype=torch.float32)
        x = torch.randn(5, 128)
        ref = x.double() @ layer.method.dequantize(layer).double().t()
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-4, atol=1e-4)


def test_int8_error_bound():
    w = torch.randn(50, 96) * torch.logspace(-3, 0, 50).unsqueeze(1)
    q, scale = quantize_int8(w, torch.bfloat16)
    step = w.abs().amax(1, keepdim=True) / 127  # the ideal per-row step, computed here independently
    err = (q.float() * scale.float().unsqueeze(1) - w).abs()
    # half a step, plus what rounding the stored scale to bfloat16 can shift the largest code (127 steps)
    assert (err <= step * (0.5 + 127 * BF16_EPS / 2) + 1e-12).all()
    assert (err.amax(1) >= 0.1 * step.squeeze(1)).all()  # and it really is quantized


def test_int4_error_bound():
    w = torch.randn(40, 128) * torch.logspace(-3, 0, 40).unsqueeze(1) + 0.3 * torch.randn(40, 1)
    blocks = quantize_int4(w, torch.bfloat16)
    assert blocks.codes().max() <= 15 and blocks.packed.dtype == torch.uint8
    g = w.view(40, 4, 32)
    lo, hi = g.amin(2, keepdim=True), g.amax(2, keepdim=True)
    step = (hi - lo) / 15
    err = (blocks.dequantize().view(40, 4, 32) - g).abs()
    # half a step; rounding scale and zero to bfloat16 can add a few percent of a step and 2^-8 of the zero
    assert (err <= 0.55 * step + BF16_EPS * torch.maximum(lo.abs(), hi.abs())).all()
    assert err.max() > 0.2 * step.min()


def test_int4_constant_groups_are_exact():
    w = torch.zeros(3, 64)
    w[0, :32], w[1, 32:], w[2] = 0.25, -1.5, 3e-3
    torch.testing.assert_close(quantize_int4(w, torch.bfloat16).dequantize(), w, rtol=BF16_EPS, atol=0)


def test_fp8_error_bound():
    w = torch.randn(20, 64) * torch.logspace(-2, 1, 20).unsqueeze(1)
    q, scale = quantize_fp8(w)
    err = (q.float() * scale.unsqueeze(1) - w).abs()
    # e4m3 keeps 3 mantissa bits: relative error 2^-4 for normals, absolute 2^-10 (half the subnormal step)
    assert (err <= w.abs() * 2.0**-4 + scale.unsqueeze(1) * 2.0**-10).all()


def test_fp8_emulated_layer():
    layer, w = quantized_linear("fp8", 64, 96)
    x = torch.randn(9, 96).to(torch.bfloat16)
    # The emulation quantizes activations per token too; compare against the unquantized product.
    ref = x.double() @ w.double().t()
    scale = x.double().abs() @ w.double().abs().t()
    assert ((layer(x).double() - ref).abs() <= scale * 2 * 2.0**-4 + 1e-3).all()


def test_odd_input_sizes_are_not_quantized():
    assert not make_method("int4", CPU, torch.bfloat16).supports(64, 48)  # 48 is not a whole number of groups
    assert not make_method("int8", CPU, torch.bfloat16).supports(64, 40)  # torch's CPU kernel reads K by 16
    assert not make_method("fp8", CPU, torch.bfloat16).supports(60, 64)


# ---- GGUF blocks ----


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_gguf_blocks_reproduce_gguf_dequantize(qtype):
    rows, cols = 24, 128
    raw = random_blocks(qtype, rows, cols, seed=3)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float64))
    blocks = gguf_blocks(raw.reshape(-1).copy(), qtype, (rows, cols))
    assert isinstance(blocks, Int8Blocks if qtype == Q.Q8_0 else Int4Blocks)
    assert blocks.shape == (rows, cols)
    # float32 scale/zero: only float32 rounding of (q - 8) d + (m + 8 d) separates us from gguf
    torch.testing.assert_close(blocks.dequantize().double(), ref, rtol=1e-6, atol=1e-7)
    # Narrowing whole groups of blocks is narrowing the dense tensor.
    for dim, start, length in ((0, 5, 7), (1, 32, 64)):
        got = blocks.narrow(dim, start, length).dequantize().double()
        torch.testing.assert_close(got, ref.narrow(dim, start, length), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="groups"):
        blocks.narrow(1, 16, 32)


@pytest.mark.parametrize("qtype,scheme", [(Q.Q4_0, "int4"), (Q.Q4_1, "int4"), (Q.Q8_0, "int8"), (Q.Q4_1, "int8")])
def test_gguf_blocks_into_layers(qtype, scheme):
    """A layer loaded from blocks holds gguf's values: Q4 blocks as they are (up to bfloat16 scale/zero), Q8_0
    requantized to one scale per row (up to half its step), any block dequantized and requantized otherwise."""
    rows, cols = 48, 128
    raw = random_blocks(qtype, rows, cols, seed=4)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    layer = Linear(cols, rows, quant=QuantConfig(scheme))
    layer.create_weights(make_method(scheme, CPU, torch.bfloat16))
    layer.write_rows(0, gguf_blocks(raw.reshape(-1).copy(), qtype, (rows, cols)))
    layer.finalize()
    got = layer.method.dequantize(layer)
    if scheme == "int4" and qtype != Q.Q8_0:
        d = ref.view(rows, -1, 32).abs().amax(2, keepdim=True)  # bounds |q - 8| d and |zero| alike
        assert ((got - ref).view(rows, -1, 32).abs() <= 16 * d * BF16_EPS).all()
    else:
        step = ref.abs().amax(1, keepdim=True) / 127
        assert ((got - ref).abs() <= step * (0.5 + 127 * BF16_EPS / 2)).all()


def test_pack_int4_nibble_order():
    q = torch.arange(32).remainder(16).view(1, 32)
    packed = pack_int4(q)
    assert packed.shape == (1, 16)
    assert (packed[0] & 0xF).tolist() == list(range(16)) and (packed[0] >> 4).tolist() == list(range(16))
    torch.testing.assert_close(Int4Blocks(packed, torch.ones(1, 1), torch.zeros(1, 1)).codes(), q.to(torch.uint8))
