"""Attention in plain PyTorch: runs on any device; the reference the fast backends are tested against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minisgl.attention.base import AttentionBackend
from minisgl.engine.forward import ForwardBatch


@dataclass
class TorchMetadata:
    slots: torch.Tensor  # [B, L] KV slot of each position (padding points at slot 0)
    mask: torch.Tensor  # [B, 1, 1, L] bool, True where the position holds a real token


class TorchBackend(AttentionBackend):
    """Gathers each sequence's KV through the page table and calls SDPA.

    Decode runs as one padded SDPA call over the batch (the hot path on CPU); extend runs one call per
    sequence with a causal mask offset by the cached prefix length.
    """

    def prepare(self, batch: ForwardBatch) -> None:
        ps = batch.page_size
        max_len = max(p + e for p, e in zip(batch.prefix_lens_cpu, batch.extend_lens_cpu))
        pos = torch.arange(max_len, device=batch.page_table.device)
        pages = batch.page_table[:, pos // ps].long()
        slots = pages * ps + pos % ps
        valid = pos.unsqueeze(0) < batch.seq_lens.unsqueeze(1)
        slots = slots.masked_fill(~valid, 0)
        batch.attn_metadata = TorchMetadata(slots=slots, mask=valid[:, None, None, :])

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, batch: ForwardBatch
    ) -> torch.Tensor:
        self.pool.store(layer_id, batch.out_loc, k, v)
        meta: TorchMetadata = batch.attn_metadata
        k_cache, v_cache = self.pool.k(layer_id), self.pool.v(layer_id)
        gqa = self.num_q_heads != self.num_kv_heads
        if batch.is_decode:
            keys = k_cache[meta.slots].transpose(1, 2)  # [B, Hkv, L, D]
            vals = v_cache[meta.slots].transpose(1, 2)
            out = F.scaled_dot_product_attention(
                q.unsqueeze(2).to(keys.dtype), keys, vals, attn_mask=meta.mask, scale=self.scale, enable_gqa=gqa
            )
            return out.squeeze(2).to(q.dtype)
        out = torch.empty_like(q)
        start = 0
        for b, (prefix, extend) in enumerate(zip(batch.prefix_lens_cpu, batch.extend_lens_cpu)):
            total = prefix + extend
            slots = meta.slots[b, :total]
            keys = k_cache[slots].transpose(0, 1)  # [Hkv, L, D]
            vals = v_cache[slots].transpose(0, 1)
            qb = q[start : start + extend].transpose(0, 1)  # [Hq, n, D]
            # query i sits at absolute position prefix + i and may see keys 0..prefix + i
            causal = torch.ones(extend, total, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
            ob = F.scaled_dot_product_attention(
                qb.to(keys.dtype), keys, vals, attn_mask=causal, scale=self.scale, enable_gqa=gqa
            )
            out[start : start + extend] = ob.transpose(0, 1).to(q.dtype)
            start += extend
        return out
