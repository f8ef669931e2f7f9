"""Attention in plain PyTorch: runs on any device; the reference the fast backends are tested against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minisgl.attention.base import AttentionBackend
from minisgl.core.forward_batch import ForwardBatch


@dataclass
class TorchMetadata:
    """Per-step gather plan. `slots` is [B * L]: the KV slot of position p of sequence b at b * L + p, with
    positions past a sequence's end pointing at slot 0 (scratch).

    Decode only: `bias` is None when every sequence has the same length (nothing to mask), else 0 where a
    position holds a real token and -inf elsewhere, [B * num_kv_heads, 1, L] in the dtype attention computes
    in."""

    slots: torch.Tensor
    max_len: int
    bias: torch.Tensor | None


def slot_table(batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, valid), both [B, L] with L the longest sequence: the KV slot of position p of sequence b (int64;
    slot 0, the scratch page, past the sequence's end) and whether p < seq_lens[b]."""
    ps = batch.page_size
    max_len = max(p + e for p, e in zip(batch.prefix_lens_cpu, batch.extend_lens_cpu))
    pos = torch.arange(max_len, device=batch.page_table.device)
    slots = batch.page_table[:, pos // ps].long() * ps + pos % ps
    valid = pos.unsqueeze(0) < batch.seq_lens.unsqueeze(1)
    return slots.masked_fill_(~valid, 0), valid


class TorchBackend(AttentionBackend):
    """Gathers each sequence's KV through the page table, then attends with plain tensor ops.

    Decode is written out as two batched matmuls over (sequence, kv head) with the GQA group folded into the
    query rows, instead of one SDPA call: on the CPU, SDPA's flash kernel is tuned for long queries and took
    ~4x longer for one query per sequence. Extend runs one causal SDPA call per sequence.
    """

    mixed_cache_dtype = True

    def prepare(self, batch: ForwardBatch) -> None:
        slots, valid = slot_table(batch)
        meta = TorchMetadata(slots=slots.reshape(-1), max_len=slots.shape[1], bias=None)
        if batch.is_decode:
            self._prepare_decode(batch, meta, valid)
        batch.attn_metadata = meta

    def _work_dtype(self, b: int) -> torch.dtype:
        if b <= 2 and self.dtype == torch.bfloat16 and self.pool.device.type == "cpu":
            # CPU bf16 bmm has a high fixed cost: at a batch of one or two, multiplying in fp32 measured ~30%
            # faster; at larger batches bf16 wins.
            return torch.float32
        return self.dtype

    def _prepare_decode(self, batch: ForwardBatch, meta: TorchMetadata, valid: torch.Tensor) -> None:
        if min(batch.prefix_lens_cpu) == max(batch.prefix_lens_cpu):
            return  # every position of every sequence is real: no mask
        bias = torch.zeros(valid.shape, dtype=self._work_dtype(batch.batch_size), device=valid.device)
        bias.masked_fill_(~valid, float("-inf"))
        meta.bias = bias.repeat_interleave(self.num_kv_heads, dim=0).unsqueeze(1)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, batch: ForwardBatch
    ) -> torch.Tensor:
        self.pool.store(layer_id, batch.out_loc, k, v)
        meta: TorchMetadata = batch.attn_metadata
        if batch.is_decode:
            return self._decode(q, layer_id, batch.batch_size, meta)
        return self._extend(q, layer_id, batch, meta)

    def _gather(self, cache: torch.Tensor, slots: torch.Tensor, b: int, length: int) -> torch.Tensor:
        """[b * num_kv_heads, length, head_dim] copy of the cached positions named by `slots`."""
        x = cache.index_select(0, slots).view(b, length, self.num_kv_heads, self.head_dim)
        return x.transpose(1, 2).reshape(b * self.num_kv_heads, length, self.head_dim)

    def _decode(self, q: torch.Tensor, layer_id: int, b: int, meta: TorchMetadata) -> torch.Tensor:
        hkv, d, dtype = self.num_kv_heads, self.head_dim, self._work_dtype(b)
        keys = self._gather(self.pool.k(layer_id), meta.slots, b, meta.max_len).to(dtype)
        vals = self._gather(self.pool.v(layer_id), meta.slots, b, meta.max_len).to(dtype)
        group = self.num_q_heads // hkv  # q heads h*group..(h+1)*group-1 read kv head h
        qg = q.to(dtype).reshape(b * hkv, group, d)
        if meta.bias is None:
            scores = torch.bmm(qg, keys.transpose(1, 2)).mul_(self.scale)
        else:
            scores = torch.baddbmm(meta.bias, qg, keys.transpose(1, 2), alpha=self.scale)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        out = torch.bmm(probs, vals)
        return out.view(b, self.num_q_heads, d).to(q.dtype)

    def _extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch, meta: TorchMetadata) -> torch.Tensor:
        k_cache, v_cache = self.pool.k(layer_id), self.pool.v(layer_id)
        gqa = self.num_q_heads != self.num_kv_heads
        slots = meta.slots.view(batch.batch_size, meta.max_len)
        out = torch.empty_like(q)
        start = 0
        for b, (prefix, extend) in enumerate(zip(batch.prefix_lens_cpu, batch.extend_lens_cpu)):
            total = prefix + extend
            # Read back from the cache even for the new tokens: rounded as they are stored (an fp16 pool), so a
            # prompt attends alike whether it comes whole, in chunks or after a cached prefix.
            keys = k_cache[slots[b, :total]].transpose(0, 1).to(self.dtype)  # [Hkv, L, D]
            vals = v_cache[slots[b, :total]].transpose(0, 1).to(self.dtype)
            qb = q[start : start + extend].transpose(0, 1).to(self.dtype)  # [Hq, n, D]
            # Four dims, batch 1: with three, torch's CPU attention takes its unfused path (several times slower).
            qb, keys, vals = qb[None], keys[None], vals[None]
            if prefix == 0:  # plain causal: the fused kernel skips the masked half
                ob = F.scaled_dot_product_attention(qb, keys, vals, is_causal=True, scale=self.scale, enable_gqa=gqa)
            else:  # query i sits at absolute position prefix + i and may see keys 0..prefix + i
                causal = torch.ones(extend, total, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
                ob = F.scaled_dot_product_attention(qb, keys, vals, attn_mask=causal, scale=self.scale, enable_gqa=gqa)
            out[start : start + extend] = ob[0].transpose(0, 1).to(q.dtype)
            start += extend
        return out
