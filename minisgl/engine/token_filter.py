"""Which tokens a row may still draw: top-k, then top-p, then min-p, as one boolean mask over the vocabulary."""

from __future__ import annotations

import torch

from minisgl.kernels.tuning import CPU_SAMPLING_CANDIDATES


def filter_mask(
    probs: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None, min_p: torch.Tensor | None
) -> torch.Tensor:
    """Which tokens survive top-k, then top-p, then min-p: bool [B, V].

    probs: float32 [B, V] rows summing to 1. top_k: int64 [B], V meaning "off". top_p: float32 [B], 1 = off;
    keeps the smallest most-probable set whose mass, renormalised after top-k, reaches top_p. min_p:
    float32 [B], 0 = off; drops p < min_p * max(p). The most probable token always survives. None skips a
    filter for the whole batch.
    """
    keep = torch.ones_like(probs, dtype=torch.bool)
    if top_k is not None or top_p is not None:
        keep = _top_k_top_p(probs, top_k, top_p)
    if min_p is not None:
        # Top-k/top-p never drop the top token and renormalising scales all ratios alike, so min-p can be
        # judged against the unfiltered probabilities.
        keep &= probs >= min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return keep


def _top_k_top_p(probs: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """filter_mask's top-k and top-p. On the CPU a sort of the whole vocabulary costs several times the rest of
    the step's sampling, and the kept set nearly always lies among the few hundred most probable tokens: those
    are ranked first (topk), and only rows they do not settle are sorted whole. On a GPU, telling the two kinds
    of row apart would stall the host, so every row is sorted."""
    b, v = probs.shape
    n = CPU_SAMPLING_CANDIDATES
    if probs.device.type != "cpu" or v <= n:
        return _keep_by_sort(probs, top_k, top_p)
    cand_p, cand = probs.topk(n, dim=-1)
    row_mass = probs.sum(dim=-1, keepdim=True) if top_p is not None else None
    keep_cand, settled = _keep_prefix(cand_p, top_k, top_p, v, row_mass)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, cand, keep_cand)
    k_off = top_k >= v if top_k is not None else torch.ones(b, dtype=torch.bool)
    unfiltered = k_off & (top_p >= 1.0) if top_p is not None else k_off  # rows that keep every token
    keep[unfiltered] = True
    rest = (~settled & ~unfiltered).nonzero().flatten()
    if len(rest):
        k = top_k.index_select(0, rest) if top_k is not None else None
        p = top_p.index_select(0, rest) if top_p is not None else None
        keep.index_copy_(0, rest, _keep_by_sort(probs.index_select(0, rest), k, p))
    return keep


def _keep_by_sort(probs: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Top-k then top-p over whole sorted rows."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep_sorted, _ = _keep_prefix(sorted_p, top_k, top_p, probs.shape[-1])
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, keep_sorted)


def _keep_prefix(
    sorted_p: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    v: int,
    row_mass: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k then top-p on the n most probable tokens of each row, `sorted_p` [B, n] (descending): which of
    them survive, and per row whether that settles the row (nothing past the n can survive). n = v (a whole
    sorted row) always settles. Otherwise `row_mass` [B, 1], the row's total probability, stands in for the
    mass of a top-k that is off."""
    n = sorted_p.shape[-1]
    keep = torch.ones_like(sorted_p, dtype=torch.bool)
    k = top_k if top_k is not None else torch.full(sorted_p.shape[:1], v, device=sorted_p.device)
    if top_k is not None:
        keep &= torch.arange(n, device=sorted_p.device)[None, :] < k[:, None]
        sorted_p = sorted_p * keep
    settled = k <= n
    if top_p is not None:
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass strictly ahead of each token
        # The mass top-p is judged against: the top-k's, which here is all of the row's when top-k is off.
        total = sorted_p.sum(dim=-1, keepdim=True)
        if row_mass is not None:
            total = torch.where(settled[:, None], total, row_mass)
        # top_p == 1 must keep everything even where cumsum rounding would push `before` up to `total`.
        keep &= (before < top_p[:, None] * total) | (top_p[:, None] >= 1.0)
        settled |= (k >= v) & (top_p < 1.0) & ~keep[:, -1]  # the cut fell among the n
    return keep, settled | (n >= v)
