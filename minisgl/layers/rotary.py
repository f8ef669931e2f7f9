"""Rotary position embedding (the half-rotation layout HF uses for Llama, Qwen, Mistral and GPT-NeoX)."""

from __future__ import annotations

import math

import torch
from torch import nn

from minisgl.models.config import RopeConfig


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


class RotaryEmbedding(nn.Module):
    """Applies rope to q and k given absolute positions. The cos/sin table grows on demand."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, device: torch.device):
        super().__init__()
        self.rotary_dim = rope.rotary_dim
        self.head_dim = head_dim
        self.inv_freq = inv_frequencies(rope).to(device)
        self._build(max_positions)

    def _build(self, n: int) -> None:
        t = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)
        # Stored as [n, rotary_dim]: cos/sin repeated for both halves, the layout rotate-half expects.
        self.cos = torch.cat([freqs.cos(), freqs.cos()], dim=-1)
        self.sin = torch.cat([freqs.sin(), freqs.sin()], dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hkv, D]; returns rotated copies in the input dtype."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin, self.rotary_dim), _rotate(k, cos, sin, self.rotary_dim)

    def ensure(self, max_position: int) -> None:
        """Grow the table to cover `max_position` (call outside of CUDA-graph capture)."""
        if max_position >= self.cos.shape[0]:
            self._build(max(max_position + 1, 2 * self.cos.shape[0]))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    dtype = x.dtype
    rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = (rot * cos + rotated * sin).to(dtype)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out
