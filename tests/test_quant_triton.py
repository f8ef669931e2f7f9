"""The Triton W8A16 / W4A16 / fp8 kernels against float64 matmuls with the dequantized weights.

Without CUDA they run under Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported). The
interpreter mishandles bfloat16 tl.dot and float8 stores, so there the GEMM paths are checked with float16
activations and the fp8 activation quantizer only on the GPU; the GEMV paths are checked in both dtypes.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from minisgl.kernels import quant_matmul as tk  # noqa: E402
from minisgl.kernels import tuning  # noqa: E402
from minisgl.kernels.quant_convert import fp8_quantize_rows  # noqa: E402
from minisgl.quant import QuantConfig, make_method  # noqa: E402
from minisgl.quant.fp8 import quantize_fp8, quantize_rows_reference  # noqa: E402
from minisgl.quant.int4 import quantize_int4  # noqa: E402
from minisgl.quant.int8 import quantize_int8  # noqa: E402

pytestmark = pytest.mark.slow  # Triton kernels in the interpreter

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")
GEMV_BATCHES = [1, 2, 3, 4]
# The last two reach the dequantize-then-F.linear path of the int4 and the 8-bit kernels.
GEMM_BATCHES = [5, 17, 64, tuning.W4_DEQUANT_MIN_M, tuning.W8_DEQUANT_MIN_M]


def half_eps(dtype: torch.dtype) -> float:
    return 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y = x @ w^T up to rounding the output (and dequantized weights, in the GEMM) to x's dtype."""
    assert y.shape == (x.shape[0], w.shape[0]) and y.dtype == x.dtype
    ref = x.double() @ w.double().t()
    bound = (x.double().abs() @ w.double().abs().t()) * 3 * half_eps(x.dtype) + 1e-5
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


def weights(n: int, k: int) -> torch.Tensor:
    torch.manual_seed(n + 7 * k)
    return torch.randn(n, k) * torch.logspace(-2, 0, n).unsqueeze(1)


def activations(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(m, k).to(device=DEV, dtype=dtype)


def dtypes(m: int) -> list[torch.dtype]:
    return [torch.bfloat16, torch.float16] if ON_GPU or m <= tuning.GEMV_MAX_M else [torch.float16]


@pytest.mark.parametrize(
    "fmt,n,k", [("int8", 37, 96), ("int8", 130, 200), ("fp8", 40, 64), ("fp8", 96, 208)]
)  # fmt: skip
def test_w8a16(fmt, n, k):
    """The 8-bit weight kernels read int8 and float8_e4m3fn weights alike, with one float32 scale per row."""
    q, scale = quantize_int8(weights(n, k), torch.float32) if fmt == "int8" else quantize_fp8(weights(n, k))
    w = q.float() * scale.unsqueeze(1)
    q, scale = q.to(DEV), scale.to(DEV)
    for m in GEMV_BATCHES + GEMM_BATCHES:
        for dtype in dtypes(m):
            x = activations(m, k, dtype)
            check(tk.w8a16_linear(x, q, scale).cpu(), x.cpu(), w)


@pytest.mark.parametrize("n,k", [(37, 96), (130, 224)])
def test_w4a16(n, k):
    for dtype in (torch.bfloat16, torch.float16):
        blocks = quantize_int4(weights(n, k), dtype)  # scale and zero exactly representable in dtype
        w = blocks.dequantize()
        packed, scale, zero = blocks.packed.to(DEV), blocks.scale.to(DEV, dtype), blocks.zero.to(DEV, dtype)
        for m in GEMV_BATCHES + GEMM_BATCHES:
            if dtype in dtypes(m):
                x = activations(m, k, dtype)
                check(tk.w4a16_linear(x, packed, scale, zero).cpu(), x.cpu(), w)


def test_strided_and_empty_inputs():
    q, scale = quantize_int8(weights(32, 64), torch.float32)
    w = q.float() * scale.unsqueeze(1)
    wide = activations(3, 128, torch.float16)
    x = wide[:, :64]  # rows not contiguous with each other: the kernels take the row stride
    check(tk.w8a16_linear(x, q.to(DEV), scale.to(DEV)).cpu(), x.cpu(), w)
    assert tk.w8a16_linear(wide[:0, :64], q.to(DEV), scale.to(DEV)).shape == (0, 32)


@pytest.mark.gpu
def test_fp8_activation_quantizer_matches_reference():
    x = (torch.randn(33, 1000) * torch.logspace(-3, 1, 33).unsqueeze(1)).to(DEV, torch.bfloat16)
    q, scale = fp8_quantize_rows(x)
    ref_q, ref_scale = quantize_rows_reference(x)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    assert torch.equal(q.float(), ref_q.float())


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_layers_on_gpu(scheme):
    """Each method's CUDA path (Triton, or _scaled_mm for fp8 beyond the weight-only batch sizes) against the
    same weights on the float32 reference path, for the 8B model's smallest shape class."""
    if scheme == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no fp8 tensor cores")
    from minisgl.layers.linear import Linear

    n, k = 1024, 4096
    with torch.device(DEV):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            layer = Linear(k, n, quant=QuantConfig(scheme))
            layer.create_weights(make_method(scheme, DEV, torch.bfloat16))
        finally:
            torch.set_default_dtype(prev)
    layer.write_rows(0, weights(n, k))
    layer.finalize()
    w = layer.method.dequantize(layer).cpu()
    for m in [1, 2, 4, 16, 17, 64, 256]:
        x = activations(m, k, torch.bfloat16)
        y = layer(x).cpu()
        if scheme == "fp8" and m > 16:  # activations quantized too: compare with the emulation
            ref = layer.method.apply_emulated(layer, x).cpu()
            torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
        else:
            check(y, x.cpu(), w)
