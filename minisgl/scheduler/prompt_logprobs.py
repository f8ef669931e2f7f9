"""Prompt logprobs (vLLM's `prompt_logprobs`, SGLang's input-token logprobs): the log-probability of each prompt
token given the ones before it, read from the logits of the prefill's own positions.

A request that wants them is prefilled from position 0 (KVManager.admit skips the prefix cache), and each of its
prefill chunks asks make_forward_batch for the logits of every position that predicts a prompt token: position p
scores token p + 1. Those rows come after the sampled ones, so sampling never sees them. Their logits are
[rows, vocab] floats, so a prefill batch computes at most MAX_ROWS of them (a long prompt takes more, shorter
chunks).
"""

from __future__ import annotations

import torch

from minisgl.scheduler.io import TokenOutput
from minisgl.scheduler.req import Req

MAX_ROWS = 256  # prompt positions with logits per prefill batch (256 x a 151k vocabulary x 4 bytes: 156 MB)


class RowBudget:
    """What is left of one prefill batch's MAX_ROWS."""

    def __init__(self) -> None:
        self.left = MAX_ROWS

    def take(self, req: Req, n: int) -> int:
        """How many of the n tokens `req` may prefill in this batch (all of them unless it wants prompt logprobs)."""
        if not req.wants_prompt_logprobs:
            return n
        n = min(n, self.left)
        self.left -= n
        return n


def wanted(reqs: list[Req]) -> list[bool] | None:
    """Which requests of a prefill batch want the logits of their prompt positions (None: none does)."""
    flags = [r.wants_prompt_logprobs for r in reqs]
    return flags if any(flags) else None


def record(reqs: list[Req], lens: list[int], wanted: list[bool], logits: torch.Tensor) -> None:
    """Store what this prefill chunk computed, before the requests' `num_computed` advances. `logits` holds the
    rows make_forward_batch added for `wanted`, in order. Index i of a request's lists is prompt token i + 1 (its
    logprob, its rank among the vocabulary, 1 the most likely, and the top alternatives);
    a chunk computed again (after its pages were taken back) overwrites its entries."""
    spans, targets = [], []
    for r, n, w in zip(reqs, lens, wanted):
        if w:
            start = r.num_computed
            stop = min(start + n, len(r.prompt_ids) - 1)
            spans.append((r, start, stop))
            targets += r.prompt_ids[start + 1 : stop + 1]
    if len(targets) != logits.shape[0]:
        raise RuntimeError(f"prompt logprobs: {logits.shape[0]} rows for {len(targets)} prompt tokens")
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen_t = logp.gather(1, torch.tensor(targets, device=logp.device)[:, None])
    chosen, ranks = chosen_t.squeeze(1).tolist(), ((logp > chosen_t).sum(-1) + 1).tolist()
    k = max(r.params.prompt_logprobs or 0 for r, _, _ in spans)
    top_ids = top_lps = None
    if k:
        values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        top_ids, top_lps = ids.tolist(), values.tolist()
    row = 0
    for r, start, stop in spans:
        m, want = stop - start, r.params.prompt_logprobs or 0
        r.prompt_logprobs[start:] = chosen[row : row + m]
        r.prompt_ranks[start:] = ranks[row : row + m]
        r.prompt_top_logprobs[start:] = [
            list(zip(top_ids[i][:want], top_lps[i][:want])) if want else [] for i in range(row, row + m)
        ]
        row += m


def attach(req: Req, out: TokenOutput) -> None:
    """Put the request's prompt logprobs on its first output (sample 0 only, once)."""
    if req.index == 0 and req.params.prompt_logprobs is not None and not req.prompt_logprobs_sent:
        out.prompt_logprobs = list(req.prompt_logprobs)
        out.prompt_top_logprobs = list(req.prompt_top_logprobs)
        out.prompt_ranks = list(req.prompt_ranks)
        req.prompt_logprobs_sent = True
