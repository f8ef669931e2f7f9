"""FlashInfer's paged attention kernels, used when the `flashinfer` package is installed (CUDA only)."""

from __future__ import annotations

import torch

from minisgl.attention.base import AttentionBackend
from minisgl.core.forward_batch import ForwardBatch

_WORKSPACE_BYTES = 256 << 20


class FlashInferBackend(AttentionBackend):
    """Plans once per step (page lists in FlashInfer's CSR form), then runs every layer on that plan.

    The pool's [slots, heads, dim] tensors are viewed as [pages, page_size, heads, dim] ("NHD"), the same
    memory, so the pool needs no conversion.
    """

    def __init__(self, *args, **kwargs):  # AttentionBackend's
        super().__init__(*args, **kwargs)
        pool = self.pool
        try:
            import flashinfer
        except ImportError as e:
            raise ImportError(
                "attention backend 'flashinfer' needs the flashinfer package (pip install flashinfer-python)"
            ) from e
        workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=pool.device)
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")

    def prepare(self, batch: ForwardBatch) -> None:
        ps = batch.page_size
        num_pages = (batch.seq_lens + ps - 1) // ps
        indptr = torch.zeros(batch.batch_size + 1, dtype=torch.int32, device=batch.seq_lens.device)
        indptr[1:] = num_pages.cumsum(0)
        cols = torch.arange(batch.page_table.shape[1], device=batch.page_table.device)
        indices = batch.page_table[cols.unsqueeze(0) < num_pages.unsqueeze(1)].int()
        last = (batch.seq_lens - 1) % ps + 1
        dtype = self.pool.dtype
        common = dict(q_data_type=dtype, kv_data_type=dtype, sm_scale=self.scale)
        if batch.is_decode:
            self.decode.plan(indptr, indices, last, self.num_q_heads, self.num_kv_heads, self.head_dim, ps, **common)
        else:
            self.prefill.plan(
                batch.cu_extend_lens,
                indptr,
                indices,
                last,
                self.num_q_heads,
                self.num_kv_heads,
                self.head_dim,
                ps,
                causal=True,
                **common,
            )

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, batch: ForwardBatch
    ) -> torch.Tensor:
        self.pool.store(layer_id, batch.out_loc, k, v)
        shape = (-1, batch.page_size, self.num_kv_heads, self.head_dim)
        kv = (self.pool.k(layer_id).view(shape), self.pool.v(layer_id).view(shape))
        wrapper = self.decode if batch.is_decode else self.prefill
        return wrapper.run(q.contiguous(), kv)
