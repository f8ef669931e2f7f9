"""Tensor-parallel rank information and the collectives the layers need."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPInfo:
    """This process's place in the tensor-parallel group. size == 1 means no communication at all."""

    rank: int = 0
    size: int = 1
    cpu_group: Any = field(default=None, compare=False, repr=False)  # gloo group for control messages

    def shard(self, n: int, what: str = "dimension") -> int:
        if n % self.size:
            raise ValueError(f"{what} {n} is not divisible by tensor-parallel size {self.size}")
        return n // self.size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)
