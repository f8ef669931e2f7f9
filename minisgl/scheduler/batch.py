"""Turning a list of scheduled requests into the ForwardBatch the model consumes."""

from __future__ import annotations

import torch

from minisgl.core.forward_batch import ForwardBatch, ForwardMode
from minisgl.core.transfer import to_device
from minisgl.scheduler.req import Req


def make_forward_batch(
    mode: ForwardMode,
    reqs: list[Req],
    extend_lens: list[int],
    needs_logits: list[bool],
    page_table: torch.Tensor,
    page_size: int,
    token_buf: torch.Tensor | None = None,
    prompt_rows: list[bool] | None = None,
) -> ForwardBatch:
    """Flatten `extend_lens[b]` new tokens of each request (starting at its `num_computed`) into one batch.

    Called before the requests' `num_computed` is advanced. In DECODE
    mode with `token_buf`, input ids are gathered on the device from each request's row of `token_buf`
    (the host may not know the last sampled token yet). `logits_index` holds first the last token of each
    request with `needs_logits`, in order, then, for each request with `prompt_rows`, in order, every new
    position that predicts a prompt token (prompt_logprobs.py reads those rows).
    """
    device = page_table.device
    ids: list[int] = []
    positions: list[int] = []
    out_loc: list[int] = []
    logits_index: list[int] = []
    prefix_lens = [r.num_computed for r in reqs]
    extra: list[int] = []
    from_device = mode is ForwardMode.DECODE and token_buf is not None
    for b, (r, n, want) in enumerate(zip(reqs, extend_lens, needs_logits)):
        start = r.num_computed
        if prompt_rows is not None and prompt_rows[b]:
            extra.extend(range(len(positions), len(positions) + min(n, len(r.prompt_ids) - 1 - start)))
        if not from_device:
            ids.extend(r.all_ids[start : start + n])
        for p in range(start, start + n):
            positions.append(p)
            out_loc.append(r.page_at(p // page_size) * page_size + p % page_size)
        if want:
            logits_index.append(len(positions) - 1)
    logits_index += extra
    seq_lens = [p + n for p, n in zip(prefix_lens, extend_lens)]
    cu = [0]
    for n in extend_lens:
        cu.append(cu[-1] + n)
    max_pages = -(-max(seq_lens) // page_size)
    rows = [r.row for r in reqs]
    b, t = len(reqs), len(positions)

    # Two host-to-device copies per step (one per dtype) instead of one per field: at small batch each
    # copy costs more host time than the data is worth.
    longs = to_device(rows + positions + out_loc + logits_index + ids, torch.int64, device)
    ints = to_device(prefix_lens + list(extend_lens) + seq_lens + cu, torch.int32, device)
    rows_t, rest = longs[:b], longs[b:]
    positions_t, out_loc_t = rest[:t], rest[t : 2 * t]
    logits_index_t, ids_t = rest[2 * t : 2 * t + len(logits_index)], rest[2 * t + len(logits_index) :]
    return ForwardBatch(
        mode=mode,
        input_ids=token_buf[rows_t] if from_device else ids_t,
        positions=positions_t,
        out_loc=out_loc_t,
        page_table=page_table[rows_t, :max_pages],
        prefix_lens=ints[:b],
        extend_lens=ints[b : 2 * b],
        seq_lens=ints[2 * b : 3 * b],
        cu_extend_lens=ints[3 * b :],
        logits_index=logits_index_t,
        prefix_lens_cpu=prefix_lens,
        extend_lens_cpu=list(extend_lens),
        page_size=page_size,
        rows=rows_t,
    )
