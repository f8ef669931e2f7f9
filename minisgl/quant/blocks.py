"""Weights that arrive already quantized (from a GGUF file), in the two layouts our methods ingest directly.

Both describe a [rows, cols] matrix cut into groups of GROUP consecutive columns. They are what a checkpoint
source yields in place of a dense tensor when a weight should stay quantized; a consumer that needs dense values
calls `dequantize()`. `narrow` mirrors `torch.Tensor.narrow`, so tensor-parallel slicing code serves both; along
the columns it only cuts at group boundaries (a group is never split between ranks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

GROUP = 32


def _check_cut(start: int, length: int) -> None:
    if start % GROUP or length % GROUP:
        raise ValueError(f"quantized groups of {GROUP} columns cannot be cut at [{start}, {start + length})")


@dataclass(frozen=True)
class Int4Blocks:
    """w[r, 32g + i] = (q - 8) * scale[r, g] + zero[r, g], q in [0, 15].

    `packed` is uint8 [rows, cols / 2]: byte 16g + j holds column 32g + j in its low nibble and column 32g + 16 + j
    in its high nibble (GGUF's Q4 nibble order, so those blocks copy over unchanged). scale is float32 and zero
    float32 or float64 (GGUF's m + 8d, kept exact), [rows, cols / 32].
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def narrow(self, dim: int, start: int, length: int) -> Int4Blocks:
        if dim == 0:
            return Int4Blocks(*(t.narrow(0, start, length) for t in (self.packed, self.scale, self.zero)))
        _check_cut(start, length)
        return Int4Blocks(
            self.packed.narrow(1, start // 2, length // 2),
            self.scale.narrow(1, start // GROUP, length // GROUP),
            self.zero.narrow(1, start // GROUP, length // GROUP),
        )

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Int4Blocks:
        """Apply a row permutation (any fn acting on dim 0 alone) to every part."""
        return Int4Blocks(fn(self.packed), fn(self.scale), fn(self.zero))

    def codes(self) -> torch.Tensor:
        """The 4-bit values q as uint8 [rows, cols]."""
        rows = self.packed.shape[0]
        p = self.packed.view(rows, -1, GROUP // 2)
        return torch.cat((p & 0x0F, p >> 4), dim=2).view(rows, -1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = self.shape
        q = self.codes().view(rows, -1, GROUP).float() - 8.0
        w = q * self.scale.float().unsqueeze(-1) + self.zero.float().unsqueeze(-1)
        return w.view(rows, cols).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols / 2] in Int4Blocks' nibble order from 4-bit values q [rows, cols] (any integer dtype)."""
    rows = q.shape[0]
    g = q.to(torch.uint8).view(rows, -1, GROUP)
    return (g[..., : GROUP // 2] | (g[..., GROUP // 2 :] << 4)).view(rows, -1)


@dataclass(frozen=True)
class Int8Blocks:
    """w[r, 32g + i] = q[r, 32g + i] * scale[r, g]: int8 q [rows, cols], float32 scale [rows, cols / 32] (Q8_0)."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def narrow(self, dim: int, start: int, length: int) -> Int8Blocks:
        if dim == 0:
            return Int8Blocks(self.q.narrow(0, start, length), self.scale.narrow(0, start, length))
        _check_cut(start, length)
        return Int8Blocks(self.q.narrow(1, start, length), self.scale.narrow(1, start // GROUP, length // GROUP))

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Int8Blocks:
        return Int8Blocks(fn(self.q), fn(self.scale))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = self.shape
        w = self.q.float().view(rows, -1, GROUP) * self.scale.float().unsqueeze(-1)
        return w.view(rows, cols).to(dtype)


QuantizedBlocks = Int4Blocks | Int8Blocks


def as_dense(w: torch.Tensor | QuantizedBlocks, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A dense tensor for `w`, dequantizing pre-quantized blocks."""
    return w.dequantize(dtype) if isinstance(w, (Int4Blocks, Int8Blocks)) else w
