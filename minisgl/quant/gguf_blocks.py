"""GGUF's 32-value block formats mapped onto our quantized layouts without touching a value.

Q4_0 (w = d (q - 8)) and Q4_1 (w = d q + m) blocks are exactly Int4Blocks groups: scale d, zero 0 or m + 8d, and
the 16 nibble bytes copy over as they are. Q8_0 (w = d q) is Int8Blocks. d and m are float16 in the file; d is
float32 here and zero = m + 8d float64, where it is exact, so a consumer gets m back exactly as zero - 8d (the
CPU int4 layout stores d and m themselves; see quant/int4.py).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from minisgl.quant.blocks import GROUP, Int4Blocks, Int8Blocks, QuantizedBlocks

_BLOCK_BYTES = {GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q4_1: 20, GGMLQuantizationType.Q8_0: 34}
MAPPED_TYPES = frozenset(_BLOCK_BYTES)


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def gguf_blocks(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> QuantizedBlocks:
    """The blocks of one 2-D tensor ([rows, cols], torch order) of type Q4_0, Q4_1 or Q8_0, from its raw bytes."""
    if qtype not in _BLOCK_BYTES:
        raise ValueError(f"GGML type {qtype.name} has no direct mapping; dequantize it instead")
    rows, cols = shape
    groups = cols // GROUP
    blocks = torch.from_numpy(np.asarray(raw)).view(rows * groups, _BLOCK_BYTES[qtype])
    d = _half(blocks, 0)
    if qtype == GGMLQuantizationType.Q8_0:
        q = blocks[:, 2:].contiguous().view(torch.int8)
        return Int8Blocks(q.view(rows, cols), d.view(rows, groups))
    if qtype == GGMLQuantizationType.Q4_0:
        zero = torch.zeros_like(d, dtype=torch.float64)
        packed = blocks[:, 2:]
    else:
        zero = _half(blocks, 2).double() + 8.0 * d.double()
        packed = blocks[:, 4:]
    return Int4Blocks(packed.contiguous().view(rows, cols // 2), d.view(rows, groups), zero.view(rows, groups))
