"""Batched token sampling: penalties, greedy, temperature, top-k / top-p / min-p, seeded draws, logprobs.

One call of `sample` serves a whole batch whose rows carry different `SamplingParams`. Everything per row
lives in device tensors built once per step by `SamplingBatch.build`; `sample` itself runs only tensor ops
(no Python loop over rows, no host sync), so it can later be captured in a CUDA graph.

Randomness is counter-based (draws.py): Gumbel noise that is a function of (seed, step, token) only, added to
the logits (the Gumbel-max trick: argmax(log p + G) is a draw from p). A request therefore gets the same tokens
whatever else shares its batch and wherever it sits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from minisgl.core.transfer import to_device
from minisgl.engine.draws import gumbel_noise, signed64
from minisgl.engine.token_filter import filter_mask
from minisgl.kernels import native
from minisgl.sampling_params import SamplingParams


@dataclass(frozen=True)
class _Penalties:
    """Per-row penalty inputs for the `rows` that use any penalty (P of them); ids are padded with V."""

    rows: torch.Tensor  # int64 [P], rows of the batch
    prompt_ids: torch.Tensor  # int64 [P, Lp]
    output_ids: torch.Tensor  # int64 [P, Lo]
    repetition: torch.Tensor  # float32 [P]
    frequency: torch.Tensor  # float32 [P]
    presence: torch.Tensor  # float32 [P]


@dataclass(frozen=True)
class _LogitBias:
    """The batch's logit_bias entries, one per (row, token): L of them (-inf for the tokens min_tokens holds
    back; a token may appear twice in a row, and index_put then adds both)."""

    rows: torch.Tensor  # int64 [L]
    ids: torch.Tensor  # int64 [L]
    values: torch.Tensor  # float32 [L]


@dataclass(frozen=True)
class SamplingBatch:
    """Device-side sampling parameters of one step's batch, built by `build`.

    Invariants: every tensor has B rows and lives on the logits' device. Greedy rows hold temperature 1 so
    the sampled path stays finite for them (their result is replaced by argmax). Disabled filters hold
    neutral values (top_k = V, top_p = 1, min_p = 0), and the matching tensor is None when no row uses it.
    The Python flags are fixed at build time so `sample` never has to ask the device. A batch of plain
    greedy rows (no penalties, logit bias or logprobs) carries no tensors at all: `sample` only takes the argmax.
    """

    vocab_size: int
    greedy: torch.Tensor | None  # bool [B]
    temperature: torch.Tensor | None  # float32 [B]
    seeds: torch.Tensor | None  # int64 [B], the 64-bit seed's bit pattern
    steps: torch.Tensor | None  # int64 [B]
    top_k: torch.Tensor | None
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    penalties: _Penalties | None
    logit_bias: _LogitBias | None
    all_greedy: bool
    any_greedy: bool
    want_logprobs: bool
    num_top_logprobs: int  # K: the largest top_logprobs asked for

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        seeds: list[int],
        steps: list[int],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        vocab_size: int,
        device: torch.device,
        eos_ids: Iterable[int] = (),
    ) -> SamplingBatch:
        """Gather the batch's parameters into device tensors (host work, once per step). `steps[i]` is the number
        of tokens row i has output before this one; below its min_tokens, `eos_ids` and its stop_token_ids get a
        bias of -inf."""
        v = vocab_size
        biased = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias.items()]
        biased += [(i, t, -math.inf) for i, p in enumerate(params) if steps[i] < p.min_tokens
                   for t in p.ending_ids(eos_ids)]  # fmt: skip

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return to_device(values, dtype, device)

        greedy = [p.greedy for p in params]
        want_logprobs = any(p.logprobs or p.top_logprobs > 0 for p in params)
        if all(greedy) and not want_logprobs and not biased and not any(p.penalised for p in params):
            # Pure argmax: nothing per row reaches the device (a host-to-device copy per field would cost
            # more than the step's sampling itself at small batch).
            return cls(
                vocab_size=v,
                greedy=None,
                temperature=None,
                seeds=None,
                steps=None,
                top_k=None,
                top_p=None,
                min_p=None,
                penalties=None,
                logit_bias=None,
                all_greedy=True,
                any_greedy=True,
                want_logprobs=False,
                num_top_logprobs=0,
            )
        top_k = [p.top_k if 0 < p.top_k < v else v for p in params]
        top_p = [float(p.top_p) for p in params]
        min_p = [float(p.min_p) for p in params]
        sampled = [not g for g in greedy]
        # Filters only matter on sampled rows; greedy rows keep neutral values so a batch of greedy rows
        # with stray top_p settings still skips the sort.
        top_k = [k if s else v for k, s in zip(top_k, sampled)]
        top_p = [x if s else 1.0 for x, s in zip(top_p, sampled)]
        min_p = [x if s else 0.0 for x, s in zip(min_p, sampled)]

        pen_rows = [i for i, p in enumerate(params) if p.penalised]
        penalties = None
        if pen_rows:

            def padded(lists: list[list[int]]) -> torch.Tensor:
                width = max(1, max(len(x) for x in lists))
                return tensor([list(x) + [v] * (width - len(x)) for x in lists], torch.int64)

            sel = [params[i] for i in pen_rows]
            # The prompt only feeds the repetition penalty; rows without one skip its ids.
            prompts = [prompt_ids[i] if params[i].repetition_penalty != 1.0 else [] for i in pen_rows]
            penalties = _Penalties(
                rows=tensor(pen_rows, torch.int64),
                prompt_ids=padded(prompts),
                output_ids=padded([output_ids[i] for i in pen_rows]),
                repetition=tensor([p.repetition_penalty for p in sel], torch.float32),
                frequency=tensor([p.frequency_penalty for p in sel], torch.float32),
                presence=tensor([p.presence_penalty for p in sel], torch.float32),
            )

        logit_bias = None
        if biased:
            rows, ids, values = zip(*biased)
            logit_bias = _LogitBias(
                tensor(list(rows), torch.int64), tensor(list(ids), torch.int64), tensor(list(values), torch.float32)
            )

        return cls(
            vocab_size=v,
            greedy=tensor(greedy, torch.bool),
            temperature=tensor([1.0 if g else float(p.temperature) for p, g in zip(params, greedy)], torch.float32),
            seeds=tensor([signed64(s) for s in seeds], torch.int64),
            steps=tensor(list(steps), torch.int64),
            top_k=tensor(top_k, torch.int64) if any(k < v for k in top_k) else None,
            top_p=tensor(top_p, torch.float32) if any(x < 1.0 for x in top_p) else None,
            min_p=tensor(min_p, torch.float32) if any(x > 0.0 for x in min_p) else None,
            penalties=penalties,
            logit_bias=logit_bias,
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            want_logprobs=want_logprobs,
            num_top_logprobs=min(v, max((p.top_logprobs for p in params), default=0)),
        )


class SampleResult(NamedTuple):
    """One step's picks, on the logits' device. The logprob fields are None unless some row asked; then
    they cover every row (rows that did not ask simply ignore theirs), with K = the batch's largest
    top_logprobs, and the top fields None when K is 0."""

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32, raw-distribution logprob of the chosen token
    top_ids: torch.Tensor | None  # [B, K] int64, best first
    top_logprobs: torch.Tensor | None  # [B, K] float32


class HostTokens(NamedTuple):
    """A SampleResult read back to the host, as lists."""

    token_ids: list[int]
    logprobs: list[float] | None
    top_ids: list[list[int]] | None
    top_logprobs: list[list[float]] | None


class PendingTokens:
    """One step's sampled tokens: on the device at once (`token_ids`, which the next step reads as its input),
    on the host once `wait()` returns. The copy to the host starts when this is made (through pinned memory, after
    the sampling kernels), so the host never waits for the device before it needs the tokens."""

    def __init__(self, result: SampleResult):
        self.token_ids = result.token_ids
        cuda = result.token_ids.is_cuda
        self._host = [t.to("cpu", non_blocking=True) if t is not None and cuda else t for t in result]
        self._event = torch.cuda.Event() if cuda else None
        if self._event is not None:
            self._event.record()
        self._read: HostTokens | None = None

    def wait(self) -> HostTokens:
        """The tokens on the host (read once; later calls, from any thread, return the same lists)."""
        if self._read is None:
            if self._event is not None:
                self._event.synchronize()
            self._read = HostTokens(*(None if t is None else t.tolist() for t in self._host))
        return self._read


def apply_penalties(logits: torch.Tensor, pen: _Penalties) -> torch.Tensor:
    """Penalised copy of float32 logits [B, V]; rows outside `pen.rows` are returned unchanged.

    Repetition (HF/CTRL) over prompt + output: seen logits are divided by r when positive, multiplied by r
    otherwise. Then frequency/presence (OpenAI) over output only: logit -= f * count + p * (count > 0).
    """
    b, v = logits.shape
    rows = logits.index_select(0, pen.rows)
    # Column v collects the padding and is dropped.
    out_counts = torch.zeros(rows.shape[0], v + 1, dtype=torch.float32, device=logits.device)
    out_counts.scatter_add_(1, pen.output_ids, torch.ones_like(pen.output_ids, dtype=torch.float32))
    out_counts = out_counts[:, :v]
    in_prompt = torch.zeros(rows.shape[0], v + 1, dtype=torch.bool, device=logits.device)
    in_prompt.scatter_(1, pen.prompt_ids, True)
    seen = in_prompt[:, :v] | (out_counts > 0)

    r = pen.repetition[:, None]
    rows = torch.where(seen, torch.where(rows > 0, rows / r, rows * r), rows)
    rows = rows - pen.frequency[:, None] * out_counts - pen.presence[:, None] * (out_counts > 0).float()
    return logits.index_copy(0, pen.rows, rows)


def _gumbel_argmax(scaled: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    # Same draw, fused: the op-by-op noise is two dozen [B, V] int64 passes over memory.
    if scaled.is_cuda:
        from minisgl.kernels.gumbel import gumbel_argmax

        return gumbel_argmax(scaled.contiguous(), batch.seeds, batch.steps)
    if native.fits(scaled) and scaled.dtype == torch.float32:
        return native.gumbel_argmax(scaled, batch.seeds, batch.steps)
    return (scaled + gumbel_noise(batch.seeds, batch.steps, batch.vocab_size)).argmax(dim=-1)


class TokenMask(NamedTuple):
    """Grammar constraints of some rows of a batch: `bitmask` int32 [B, ceil(V / 32)] on the logits' device (bit i
    of word j of row b allows token 32 * j + i in row b), `rows` the constrained rows (an int64 tensor on the
    same device) and `indices` the same on the host. Rows outside `rows` are not read."""

    bitmask: torch.Tensor
    rows: torch.Tensor
    indices: list[int]


_BITS: dict[torch.device, torch.Tensor] = {}


def apply_token_mask(logits: torch.Tensor, mask: TokenMask, inplace: bool = False) -> torch.Tensor:
    """float32 `logits` [B, V] with the tokens `mask` disallows set to -inf in its rows (other rows unchanged):
    `logits` itself when `inplace`, else a copy."""
    v = logits.shape[1]
    try:  # xgrammar's kernels (C++ on the CPU, CUDA/Triton on the GPU) read the packed bits directly
        from xgrammar import apply_token_bitmask_inplace
    except ImportError:
        apply_token_bitmask_inplace = None
    if apply_token_bitmask_inplace is not None:
        out = logits if inplace else logits.clone()
        # On a GPU the rows go as a device tensor: from a list, xgrammar would copy them from pageable memory,
        # which waits for the whole stream and so stalls overlap scheduling.
        indices = mask.rows.to(torch.int32) if logits.is_cuda else mask.indices
        apply_token_bitmask_inplace(out, mask.bitmask, vocab_size=v, indices=indices)
        return out
    # The same in torch ops: unpack the bits into a bool [R, V] mask (an order of magnitude slower on the CPU).
    bits = _BITS.get(logits.device)
    if bits is None:
        bits = _BITS[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
    words = mask.bitmask.index_select(0, mask.rows)
    allowed = ((words[:, :, None] >> bits) & 1).view(words.shape[0], -1)[:, :v].bool()
    rows = logits.index_select(0, mask.rows).masked_fill_(~allowed, float("-inf"))
    return logits.index_copy_(0, mask.rows, rows) if inplace else logits.index_copy(0, mask.rows, rows)


def sample(logits: torch.Tensor, batch: SamplingBatch, mask: TokenMask | None = None) -> SampleResult:
    """Pick one token per row of `logits` [B, V] (any float dtype) as `batch` says, among the tokens `mask`
    allows in its rows. Logprobs stay those of the model's own (unbiased, unpenalised, unmasked) distribution. With a
    mask and no logprobs, float32 `logits` may be masked in place."""
    if logits.shape[-1] != batch.vocab_size:
        raise ValueError(f"logits have {logits.shape[-1]} columns, the batch expects {batch.vocab_size}")
    if batch.all_greedy and batch.penalties is None and batch.logit_bias is None and not batch.want_logprobs:
        x = logits if mask is None else apply_token_mask(logits.float(), mask, inplace=True)
        return SampleResult(x.argmax(dim=-1), None, None, None)

    raw = logits.float()
    x = raw
    if batch.logit_bias is not None:
        lb = batch.logit_bias
        x = raw.index_put((lb.rows, lb.ids), lb.values, accumulate=True)
    if batch.penalties is not None:
        x = apply_penalties(x, batch.penalties)
    if mask is not None:  # in place unless x is still the raw logits that logprobs need below
        x = apply_token_mask(x, mask, inplace=x is not raw or not batch.want_logprobs)

    if batch.all_greedy:
        tokens = x.argmax(dim=-1)
    else:
        scaled = x / batch.temperature[:, None]
        if batch.top_k is not None or batch.top_p is not None or batch.min_p is not None:
            keep = filter_mask(torch.softmax(scaled, dim=-1), batch.top_k, batch.top_p, batch.min_p)
            scaled = scaled.masked_fill(~keep, float("-inf"))
        # Gumbel-max on the filtered logits draws from the renormalised filtered distribution: the
        # softmax normaliser is a per-row constant that cannot move the argmax.
        tokens = _gumbel_argmax(scaled, batch)
        if batch.any_greedy:
            tokens = torch.where(batch.greedy, x.argmax(dim=-1), tokens)

    if not batch.want_logprobs:
        return SampleResult(tokens, None, None, None)
    logp = torch.log_softmax(raw, dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)
    if batch.num_top_logprobs == 0:
        return SampleResult(tokens, chosen, None, None)
    top_lp, top_ids = logp.topk(batch.num_top_logprobs, dim=-1)
    return SampleResult(tokens, chosen, top_ids, top_lp)
