"""The per-step description of a batch, as the model and attention backends see it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch


class ForwardMode(Enum):
    EXTEND = "extend"  # prefill of a prompt chunk, possibly on top of a cached prefix
    DECODE = "decode"  # exactly one new token per sequence


@dataclass
class ForwardBatch:
    """Flat token layout for one model step.

    Invariants (B sequences, T new tokens in all):
    - `input_ids`, `positions`, `out_loc` have shape [T]; `out_loc[i]` is the KV slot that token i writes.
    - `extend_lens[b]` new tokens of sequence b follow `prefix_lens[b]` tokens already in the cache;
      `seq_lens = prefix_lens + extend_lens`. `cu_extend_lens` is the exclusive prefix sum, shape [B + 1].
    - `page_table[b, j]` is the page that holds positions [j*page_size, (j+1)*page_size) of sequence b,
      so position p lives in slot `page_table[b, p // page_size] * page_size + p % page_size`.
    - In DECODE mode every `extend_lens[b] == 1`.
    - `logits_index` selects the rows of the hidden states whose logits are needed (the last new token of
      each sequence that is not mid-way through a chunked prefill).
    The `*_cpu` lists mirror the small per-sequence tensors so host code never has to sync on a device tensor.
    """

    mode: ForwardMode
    input_ids: torch.Tensor
    positions: torch.Tensor
    out_loc: torch.Tensor
    page_table: torch.Tensor
    prefix_lens: torch.Tensor
    extend_lens: torch.Tensor
    seq_lens: torch.Tensor
    cu_extend_lens: torch.Tensor
    logits_index: torch.Tensor
    prefix_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    page_size: int
    rows: torch.Tensor | None = None  # the scheduler's page-table row of each sequence (not read by the model)
    attn_backend: Any = None  # the AttentionBackend that runs this step
    attn_metadata: Any = None  # filled by the attention backend's prepare()

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def is_decode(self) -> bool:
        return self.mode is ForwardMode.DECODE
