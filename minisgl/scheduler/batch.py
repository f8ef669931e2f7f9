"""Turning a list of scheduled requests into the ForwardBatch the model consumes."""

from __future__ import annotations

import torch

from minisgl.engine.forward import ForwardBatch, ForwardMode
from minisgl.scheduler.req import Req


def make_forward_batch(
    mode: ForwardMode,
    reqs: list[Req],
    extend_lens: list[int],
    needs_logits: list[bool],
    page_table: torch.Tensor,
    page_size: int,
    token_buf: torch.Tensor | None = None,
) -> ForwardBatch:
    """Flatten `extend_lens[b]` new tokens of each request (starting at its `num_computed`) into one batch.

    Called before the requests' `num_computed` is advanced. One host-to-device copy per tensor. In DECODE
    mode with `token_buf`, input ids are gathered on the device from each request's row of `token_buf`
    (the host may not know the last sampled token yet).
    """
    device = page_table.device
    ids: list[int] = []
    positions: list[int] = []
    out_loc: list[int] = []
    logits_index: list[int] = []
    prefix_lens = [r.num_computed for r in reqs]
    from_device = mode is ForwardMode.DECODE and token_buf is not None
    for r, n, want in zip(reqs, extend_lens, needs_logits):
        start = r.num_computed
        if not from_device:
            ids.extend(r.all_ids[start : start + n])
        for p in range(start, start + n):
            positions.append(p)
            out_loc.append(r.page_at(p // page_size) * page_size + p % page_size)
        if want:
            logits_index.append(len(positions) - 1)
    seq_lens = [p + n for p, n in zip(prefix_lens, extend_lens)]
    cu = [0]
    for n in extend_lens:
        cu.append(cu[-1] + n)
    max_pages = -(-max(seq_lens) // page_size)
    rows = torch.tensor([r.row for r in reqs], dtype=torch.long, device=device)

    def t(x: list[int], dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(x, dtype=dtype, device=device)

    return ForwardBatch(
        mode=mode,
        input_ids=token_buf[rows] if from_device else t(ids),
        positions=t(positions),
        out_loc=t(out_loc),
        page_table=page_table[rows, :max_pages],
        prefix_lens=t(prefix_lens, torch.int32),
        extend_lens=t(extend_lens, torch.int32),
        seq_lens=t(seq_lens, torch.int32),
        cu_extend_lens=t(cu, torch.int32),
        logits_index=t(logits_index),
        prefix_lens_cpu=prefix_lens,
        extend_lens_cpu=list(extend_lens),
        page_size=page_size,
    )
