"""The attention layer as models see it: project-free, it hands q/k/v to the step's attention backend."""

from __future__ import annotations

import torch
from torch import nn

from minisgl.core.forward_batch import ForwardBatch


class PagedAttention(nn.Module):
    """Stores this layer's new k/v in the paged pool and attends through `batch.attn_backend`."""

    def __init__(self, layer_id: int, num_q_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.layer_id = layer_id
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        t = q.shape[0]
        q = q.view(t, self.num_q_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        o = batch.attn_backend.forward(q, k, v, self.layer_id, batch)
        return o.reshape(t, self.num_q_heads * self.head_dim)
