"""Per-request state inside the scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from minisgl.sampling_params import SamplingParams

_MASK63 = (1 << 63) - 1


@dataclass(eq=False)
class Req:
    """One sample of one request.

    KV bookkeeping invariants:
    - `num_computed` tokens of `all_ids` have KV in the pool; their pages are `cached_pages + own_pages`
      in position order (page j covers positions [j*page_size, (j+1)*page_size)).
    - `cached_pages` belong to the prefix cache and stay valid because `handle` is locked; `own_pages`
      belong to this request until it hands them to the cache or frees them.
    - `row` is this request's page-table row while it holds pages, else -1.
    - While decoding, `num_computed == len(all_ids) + pending - 1`: the newest token's KV is written by the
      next step, which reads that token from the device (`Scheduler.token_buf`), not from `all_ids`.
    """

    rid: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    max_len: int  # prompt + output may not exceed this many tokens
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    pending: int = 0  # tokens sampled on the device that the host has not read yet (overlap scheduling)
    row: int = -1
    handle: Any = None
    cached_pages: list[int] = field(default_factory=list)
    own_pages: list[int] = field(default_factory=list)
    num_cached_prompt: int = 0  # prompt tokens served by the prefix cache on first admission
    admitted: bool = False
    finish_reason: str | None = None
    wait_for: Req | None = None  # a sibling sample whose prefill must finish first (n > 1 sharing)
    grammar: Any = None  # this sample's grammar Matcher: advanced only by tokens it really accepted
    # params.prompt_logprobs, sample 0 only: prompt tokens 1.. as their prefill computes them; sent once, whole
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_ranks: list[int] = field(default_factory=list)
    prompt_logprobs_sent: bool = False

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def pages(self) -> list[int]:
        return self.cached_pages + self.own_pages

    @property
    def num_pages(self) -> int:
        return len(self.cached_pages) + len(self.own_pages)

    def page_at(self, j: int) -> int:
        """Page j of `pages`, without building the list (which is as long as the sequence at page size 1)."""
        c = len(self.cached_pages)
        return self.cached_pages[j] if j < c else self.own_pages[j - c]

    @property
    def prefilled(self) -> bool:
        return self.num_computed >= self.seq_len - 1 and bool(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether prompt logprobs are still to be computed: its prefill then starts at 0 (no cached prefix)."""
        return (
            self.index == 0
            and self.params.prompt_logprobs is not None
            and len(self.prompt_logprobs) < len(self.prompt_ids) - 1
        )


def samples(
    rid: str, prompt_ids: list[int], params: SamplingParams, base_seed: int, max_len: int, share_prompt: bool
) -> list[Req]:
    """The `params.n` samples of one request. Sample 0 draws with `base_seed` and sample i with a seed derived
    from it and i, so the samples differ and the request stays reproducible. With `share_prompt`, every sample
    after the first waits for its prefill, then finds the prompt's KV in the prefix cache."""
    reqs = [Req(rid, 0, list(prompt_ids), params, base_seed, max_len)]
    for i in range(1, params.n):
        seed = (base_seed * 0x9E3779B97F4A7C15 + i) & _MASK63
        reqs.append(Req(rid, i, list(prompt_ids), params, seed, max_len))
        if share_prompt:
            reqs[-1].wait_for = reqs[0]
    return reqs


def check_prompt(input_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """Raise ValueError when a request can never run on this model: bad parameters, ids outside the vocabulary,
    or no room left in the context for a single output token."""
    params.validate()
    if not input_ids:
        raise ValueError("the prompt is empty")
    if min(input_ids) < 0 or max(input_ids) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    if params.logit_bias and max(params.logit_bias) >= vocab_size:
        raise ValueError(f"logit_bias token ids must be in [0, {vocab_size})")
    if len(input_ids) >= max_model_len:
        raise ValueError(
            f"prompt has {len(input_ids)} tokens; the context length is {max_model_len} and at least one token "
            "must be generated"
        )
