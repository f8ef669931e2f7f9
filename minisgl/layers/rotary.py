"""Rotary position embedding (the half-rotation layout HF uses for Llama, Qwen, Mistral and GPT-NeoX)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from minisgl.kernels import native


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters. `rotary_dim` <= head_dim (GPT-NeoX rotates only a fraction)."""

    theta: float
    rotary_dim: int
    scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear"|..., ...}; None = plain rope


def inv_frequencies(rope: RopeConfig) -> torch.Tensor:
    """Per-pair inverse frequencies, with the checkpoint's rope scaling applied."""
    dim = rope.rotary_dim
    inv = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = rope.scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        medium = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv = torch.where(medium, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind not in ("default",):
        raise NotImplementedError(f"rope scaling type {kind!r} is not supported (default, linear, llama3 are)")
    return inv.float()


class Rope(NamedTuple):
    """cos and sin of one step's positions, [T, rotary_dim // 2] each: looked up once per forward, used by
    every layer."""

    cos: torch.Tensor
    sin: torch.Tensor


class RotaryEmbedding(nn.Module):
    """The cos/sin table of a model, for positions 0..max_positions-1 (the engine never runs a sequence past the
    model's max length). Like HF, angles are computed in float32 and the table is then cast to the model dtype
    (the default dtype when the model is built), so half-precision models rotate in their own dtype as HF's do."""

    def __init__(self, rope: RopeConfig, max_positions: int, device: torch.device):
        super().__init__()
        dtype = torch.get_default_dtype()
        inv_freq = inv_frequencies(rope).to(device)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=device), inv_freq)
        self.cos = freqs.cos().to(dtype)
        self.sin = freqs.sin().to(dtype)

    def lookup(self, positions: torch.Tensor) -> Rope:
        return Rope(self.cos[positions], self.sin[positions])


def apply_rotary(x: torch.Tensor, rope: Rope) -> None:
    """Rotate x [T, ..., head_dim] in place: pairs (i, i + half) of the first rotary_dim dims turn by the
    angle of the token's position. In place, so q and k can be rotated inside the fused qkv output."""
    if x.is_cuda:
        from minisgl.kernels.rotary import rotary_

        return rotary_(x, rope.cos, rope.sin)
    if x.dim() == 3 and x.stride(1) == x.shape[2] and native.fits(x, rope.cos, rope.sin):
        return native.rotary_(x, rope.cos, rope.sin)
    half = rope.cos.shape[-1]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos, sin = rope.cos.view(shape), rope.sin.view(shape)
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    x1_sin = x1 * sin  # x1 is overwritten before x2 needs it
    x1.mul_(cos).addcmul_(x2, sin, value=-1)
    x2.mul_(cos).add_(x1_sin)
