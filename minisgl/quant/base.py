"""The interface every weight quantization scheme implements for `Linear`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from minisgl.quant.blocks import QuantizedBlocks


class QuantMethod(ABC):
    """How a Linear layer stores and multiplies its weight in one scheme, on one device.

    A method holds no tensors: they are buffers of the layer (each scheme documents their names), so one method
    object serves every layer. The lifecycle of a layer's weight is
      create_weights   quantized storage only (a dense weight of the layer's size never exists),
      load_rows        any number of times, each covering distinct output rows, quantizing as they stream in,
      finalize         once, after every row is in: device-specific re-layout,
      apply            y = x W^T in the activations' dtype (the bias is the layer's business).
    `dequantize` returns the float32 weight the layer effectively multiplies by, before or after finalize; it is
    the reference the fast paths are tested against.
    """

    name: ClassVar[str]

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.dtype = dtype  # the activations' dtype

    def supports(self, out_features: int, in_features: int) -> bool:
        """Whether a layer of this shape can use the scheme (otherwise it stays dense)."""
        return True

    @abstractmethod
    def create_weights(self, layer: nn.Module, out_features: int, in_features: int) -> None: ...

    @abstractmethod
    def load_rows(self, layer: nn.Module, start: int, weight: torch.Tensor | QuantizedBlocks) -> None: ...

    def finalize(self, layer: nn.Module) -> None:  # noqa: B027 - a hook: most schemes need no re-layout
        pass

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def dequantize(self, layer: nn.Module) -> torch.Tensor: ...


def rows_to_device(weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float32 copy of one streamed weight slice on the device that quantizes it."""
    return weight.to(device=device, dtype=torch.float32)
