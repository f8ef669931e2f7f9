"""The interface every attention backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from minisgl.core.forward_batch import ForwardBatch
    from minisgl.kvcache.pool import KVPool


class AttentionBackend(ABC):
    """Paged attention over a `KVPool`.

    Contract: `prepare(batch)` runs once per step before the model forward and may stash metadata in
    `batch.attn_metadata`; `forward` is called once per layer. It first writes the new tokens' k/v into
    the pool at `batch.out_loc`, then attends causally: new token i of sequence b (absolute position
    `prefix_lens[b] + i`) sees every cached position <= its own, read through `batch.page_table`.
    q is [T, num_q_heads, head_dim]; k and v are [T, num_kv_heads, head_dim]; the result is shaped like q.
    Query heads map to kv heads in groups (GQA): q head h reads kv head h // (num_q_heads // num_kv_heads).
    A backend sets `supports_cuda_graph` when its DECODE path reads nothing but the batch's tensors (no
    host-side metadata from `prepare`), so a captured decode step stays valid for any batch.
    """

    supports_cuda_graph: bool = False
    # Whether q (and the result) may have another dtype than the pool's k/v: an fp16 cache under fp32 activations.
    mixed_cache_dtype: bool = False

    def __init__(
        self,
        pool: KVPool,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        dtype: torch.dtype | None = None,
    ):
        self.pool = pool
        self.dtype = dtype or pool.dtype  # q's and the result's
        if self.dtype != pool.dtype and not self.mixed_cache_dtype:
            raise ValueError(f"attention backend {type(self).__name__} needs the KV cache in the activations' dtype "
                             f"({self.dtype}), not {pool.dtype}")  # fmt: skip
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def prepare(self, batch: ForwardBatch) -> None:  # noqa: B027 - optional hook
        """Build per-step metadata (host side). Default: nothing."""

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, batch: ForwardBatch
    ) -> torch.Tensor: ...
