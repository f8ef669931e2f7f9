"""Weight quantization: per-scheme methods for Linear layers, pre-quantized GGUF blocks, Triton kernels."""

from __future__ import annotations

import torch

from minisgl.quant.base import QuantMethod
from minisgl.quant.config import KEEP_GGUF, SCHEMES, QuantConfig, resolve_quant_config

__all__ = ["KEEP_GGUF", "SCHEMES", "QuantConfig", "QuantMethod", "make_method", "resolve_quant_config"]


def make_method(scheme: str, device: torch.device, dtype: torch.dtype, int8_activations: bool = False) -> QuantMethod:
    """The method object for `scheme` on `device` with activations of `dtype` (shared by all its layers);
    int8_activations: see QuantConfig (CPU int4 and int8 only)."""
    from minisgl.quant.fp8 import Fp8Method
    from minisgl.quant.int4 import Int4CpuMethod, Int4CudaMethod
    from minisgl.quant.int8 import Int8CpuMethod, Int8CudaMethod

    if device.type != "cuda" and scheme in ("int4", "int8"):
        return (Int4CpuMethod if scheme == "int4" else Int8CpuMethod)(device, dtype, int8_activations)
    methods: dict[str, type[QuantMethod]] = {
        "int8": Int8CudaMethod,
        "int4": Int4CudaMethod,
        "fp8": Fp8Method,
    }
    return methods[scheme](device, dtype)
