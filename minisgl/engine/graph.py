"""CUDA graphs for decode: capture the model once per batch-size bucket, replay with padded inputs."""

from __future__ import annotations

import logging

import torch

from minisgl.core.forward_batch import ForwardBatch, ForwardMode

logger = logging.getLogger(__name__)


def batch_buckets(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256, then every 16: padding wastes at most ~8 rows."""
    sizes = [1, 2, 4] + list(range(8, 257, 8)) + list(range(272, max_bs + 1, 16))
    return [b for b in sizes if b <= max_bs]


class CudaGraphRunner:
    """Replays captured decode steps.

    Invariants: captured graphs read only the static buffers below, so a replay first copies the real
    batch into them; rows past the real batch are padding that writes its (ignored) k/v into slot 0 of the
    reserved scratch page 0 and attends to that one slot. The page-table buffer has the width of the
    longest possible sequence, so any batch fits.
    """

    def __init__(self, model: torch.nn.Module, backend, max_bs: int, max_pages: int, page_size: int, device):
        self.model = model
        self.backend = backend
        self.page_size = page_size
        self.buckets = batch_buckets(max_bs)
        self.max_bs = self.buckets[-1]
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.out_loc = torch.zeros(n, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.page_table = torch.zeros(n, max_pages, dtype=torch.int32, device=device)
        self.arange = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.rows = torch.arange(n, dtype=torch.int64, device=device)
        self.ones = torch.ones(n, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # A graph replays raw addresses: every tensor it reads must outlive it, so the static batches are
        # kept here rather than built into temporaries that the allocator would hand to someone else.
        self.batches: dict[int, ForwardBatch] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self._capture_all()

    def _static_batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_loc=self.out_loc[:bs],
            page_table=self.page_table[:bs],
            prefix_lens=self.seq_lens[:bs] - 1,  # placeholder: decode reads seq_lens only
            extend_lens=self.ones[:bs],
            seq_lens=self.seq_lens[:bs],
            cu_extend_lens=self.arange[: bs + 1],
            logits_index=self.rows[:bs],
            prefix_lens_cpu=[0] * bs,
            extend_lens_cpu=[1] * bs,
            page_size=self.page_size,
            attn_backend=self.backend,
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        free_before = torch.cuda.mem_get_info()[0]
        stream = torch.cuda.Stream()
        for bs in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
            batch = self._static_batch(bs)
            self.backend.prepare(batch)
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: compile kernels, settle allocations outside capture
                    self.model(batch)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                out = self.model(batch)
            self.pool = graph.pool()
            self.graphs[bs], self.outputs[bs], self.batches[bs] = graph, out, batch
        torch.cuda.synchronize()
        used = (free_before - torch.cuda.mem_get_info()[0]) / 2**20
        logger.info("captured %d decode CUDA graphs (bs <= %d) using %.0f MiB", len(self.graphs), self.max_bs, used)

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.is_decode and batch.batch_size <= self.max_bs

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        n = batch.batch_size
        bs = next(b for b in self.buckets if b >= n)
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.out_loc[:n].copy_(batch.out_loc)
        self.seq_lens[:n].copy_(batch.seq_lens)
        self.page_table[:n, : batch.page_table.shape[1]].copy_(batch.page_table)
        if bs > n:
            self.out_loc[n:bs].zero_()
            self.seq_lens[n:bs].fill_(1)
            self.page_table[n:bs, 0].zero_()
            self.positions[n:bs].zero_()
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
