"""GGML block formats to float32: torch versions of the commonest, gguf's numpy dequantizers for the rest."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from minisgl.models.gguf.reader import GGUFTensorInfo, tensor_bytes

_SUPPORTED_TYPES = {
    GGMLQuantizationType[t]
    for t in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
}


def dequantize_raw(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 tensor of `shape` from the raw bytes of one tensor."""
    if qtype not in _SUPPORTED_TYPES:
        raise ValueError(f"GGML type {qtype.name} is not supported")
    if qtype == GGMLQuantizationType.F32:
        return torch.from_numpy(raw.view(np.float32)).view(shape)
    fast = _FAST_DEQUANT.get(qtype)
    if fast is not None:
        return fast(torch.from_numpy(raw)).view(shape)
    from gguf.quants import dequantize

    block, type_size = GGML_QUANT_SIZES[qtype]
    rows = raw.reshape(-1, shape[-1] // block * type_size)
    return torch.from_numpy(np.ascontiguousarray(dequantize(rows, qtype), dtype=np.float32)).view(shape)


# Torch versions of the commonest block formats: gguf's numpy dequantizers are single-threaded and make several
# temporaries (2.5 s for SmolLM2-135M's Q4_1 weights); these compute the same float32 values (the tests check
# bit-equality against gguf.quants.dequantize) several times faster. Other types go through gguf.


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # Low nibbles hold a block's first 16 values, high nibbles its last 16.
    return torch.cat((qs & 0x0F, qs >> 4), dim=1).float()


def _dequant_q8_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 34)
    return _half(blocks, 0) * blocks[:, 2:].contiguous().view(torch.int8).float()


def _dequant_q4_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 18)
    return _half(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8.0)


def _dequant_q4_1(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 20)
    # Kept as a separate multiply and add (no fused addcmul) so rounding matches gguf's numpy exactly.
    scaled = _half(blocks, 0) * _nibbles(blocks[:, 4:])
    return scaled + _half(blocks, 2)


def _dequant_f16(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.float16).float()


def _dequant_bf16(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.bfloat16).float()


_FAST_DEQUANT = {
    GGMLQuantizationType.Q8_0: _dequant_q8_0,
    GGMLQuantizationType.Q4_0: _dequant_q4_0,
    GGMLQuantizationType.Q4_1: _dequant_q4_1,
    GGMLQuantizationType.F16: _dequant_f16,
    GGMLQuantizationType.BF16: _dequant_bf16,
}


def dequantize_tensor(path: str, info: GGUFTensorInfo) -> torch.Tensor:
    """One tensor of the file as float32 in torch shape order, without any name-specific transform."""
    return dequantize_raw(tensor_bytes(path, info), info.ggml_type, info.shape)
