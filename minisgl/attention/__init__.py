"""Attention backends, chosen by name."""

from __future__ import annotations

import torch

from minisgl.attention.base import AttentionBackend
from minisgl.kvcache.pool import KVPool

BACKENDS = ("torch", "cpu", "triton", "flashinfer")


def default_backend(device: torch.device) -> str:
    if device.type == "cuda":
        return "triton"
    from minisgl.kernels import native

    return "cpu" if native.available() else "torch"


def create_backend(
    name: str,
    pool: KVPool,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scale: float,
    dtype: torch.dtype | None = None,
) -> AttentionBackend:
    """`dtype`: the activations' (None: the pool's); a backend without `mixed_cache_dtype` refuses a pool of
    another dtype."""
    if name == "torch":
        from minisgl.attention.torch_backend import TorchBackend as cls
    elif name == "cpu":
        from minisgl.attention.cpu_backend import CpuBackend as cls
    elif name == "triton":
        from minisgl.attention.triton_backend import TritonBackend as cls
    elif name == "flashinfer":
        from minisgl.attention.flashinfer_backend import FlashInferBackend as cls
    else:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return cls(pool, num_q_heads, num_kv_heads, head_dim, scale, dtype)
