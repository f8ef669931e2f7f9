"""Paged attention with minisgl's own Triton kernels: the default backend on CUDA."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minisgl.attention.base import AttentionBackend
from minisgl.core import settings
from minisgl.core.forward_batch import ForwardBatch
from minisgl.kernels.decode_attention import decode_attention, decode_block_n, num_kv_splits
from minisgl.kernels.extend_attention import extend_attention, extend_blocks, extend_tiles

# Without an SM count (the CPU, under Triton's interpreter) pretend a small GPU, so tests exercise splits.
_CPU_SMS = 4


@dataclass
class ExtendMetadata:
    tiles: torch.Tensor  # [2, tiles] int32: each tile's sequence and first new-token index (extend_tiles)


class TritonBackend(AttentionBackend):
    """Decode: split-KV kernel over the page table; extend: tiled causal kernel over prefix + chunk.

    Invariant (what makes decode CUDA-graph safe): the DECODE path reads only `batch.seq_lens`,
    `batch.page_table` and `batch.out_loc` on the device, and its launch shapes depend on the batch size
    alone. Only EXTEND uses host metadata built by `prepare`.
    On the CPU the kernels run only under Triton's interpreter (`TRITON_INTERPRET=1`, set before triton is
    imported): that is for tests.
    """

    supports_cuda_graph = True

    def __init__(self, *args, **kwargs):  # AttentionBackend's
        super().__init__(*args, **kwargs)
        pool, head_dim = self.pool, self.head_dim
        if head_dim < 16 or head_dim & (head_dim - 1):
            raise ValueError(f"attention backend 'triton' needs a power-of-two head_dim >= 16, got {head_dim}")
        if pool.device.type == "cuda":
            self.num_sms = torch.cuda.get_device_properties(pool.device).multi_processor_count
        elif settings.triton_interpret():
            self.num_sms = _CPU_SMS
        else:
            raise RuntimeError("attention backend 'triton' runs on CUDA (or on the CPU under TRITON_INTERPRET=1)")
        self.decode_block_n = decode_block_n(head_dim, pool.dtype)
        self.block_m, self.block_n = extend_blocks(head_dim, pool.dtype)

    def prepare(self, batch: ForwardBatch) -> None:
        if batch.is_decode:
            batch.attn_metadata = None  # decode needs nothing beyond the batch's tensors
            return
        tiles = extend_tiles(batch.extend_lens_cpu, self.block_m, batch.page_table.device)
        batch.attn_metadata = ExtendMetadata(tiles=tiles)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, batch: ForwardBatch
    ) -> torch.Tensor:
        self.pool.store(layer_id, batch.out_loc, k, v)
        k_cache, v_cache = self.pool.k(layer_id), self.pool.v(layer_id)
        if batch.is_decode:
            splits = num_kv_splits(q.shape[0], self.num_kv_heads, self.num_sms)
            return decode_attention(
                q,
                k_cache,
                v_cache,
                batch.page_table,
                batch.seq_lens,
                batch.page_size,
                self.scale,
                splits,
                block_n=self.decode_block_n,
            )
        meta: ExtendMetadata = batch.attn_metadata
        return extend_attention(
            q,
            k_cache,
            v_cache,
            batch.page_table,
            batch.prefix_lens,
            batch.cu_extend_lens,
            meta.tiles,
            batch.page_size,
            self.scale,
            self.block_m,
            self.block_n,
        )
