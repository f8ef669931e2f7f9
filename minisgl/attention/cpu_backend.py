"""Attention on the CPU: decode in one native call per layer, prefill through the torch backend."""

from __future__ import annotations

from typing import NamedTuple

import torch

from minisgl.attention.torch_backend import TorchBackend, slot_table
from minisgl.core.forward_batch import ForwardBatch
from minisgl.kernels import native


class CpuDecodeMetadata(NamedTuple):
    """A decode step's gather plan for the native kernel (and the native decoder layer)."""

    slots: torch.Tensor  # [B, L] int64, see slot_table
    lens: torch.Tensor  # [B] int64


class CpuBackend(TorchBackend):
    """The torch backend, with decode (store the new k/v, attend through the page table) done by
    `native.decode_attention`: one call per layer in place of a gather, two matmuls and a softmax, whose
    per-op cost dominated small batches. Prefill (extend) is the torch backend's; so is decode when the native
    kernels do not fit the pool (no compiler, or a dtype they lack)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.native_decode = native.fits_kv_cache(self.dtype, self.pool.k(0))

    def prepare(self, batch: ForwardBatch) -> None:
        if not (batch.is_decode and self.native_decode):
            return super().prepare(batch)
        slots, _ = slot_table(batch)
        batch.attn_metadata = CpuDecodeMetadata(slots, batch.seq_lens.to(torch.int64))

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, batch: ForwardBatch
    ) -> torch.Tensor:
        if not (batch.is_decode and self.native_decode):
            return super().forward(q, k, v, layer_id, batch)
        meta: CpuDecodeMetadata = batch.attn_metadata
        return native.decode_attention(
            q, k, v, batch.out_loc.long(), self.pool.k(layer_id), self.pool.v(layer_id), meta.slots, meta.lens,
            self.scale,
        )  # fmt: skip
