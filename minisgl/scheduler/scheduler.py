"""Continuous batching: admit, prefill in chunks, decode, retract under memory pressure, finish."""

from __future__ import annotations

import logging
import random
from collections import deque

import torch
import torch.distributed as dist

from minisgl.distributed.info import TPInfo
from minisgl.engine.config import EngineConfig
from minisgl.engine.engine import Engine
from minisgl.engine.forward import ForwardMode
from minisgl.engine.sampling import SamplingBatch, sample
from minisgl.sampling_params import SamplingParams
from minisgl.scheduler.batch import make_forward_batch
from minisgl.scheduler.io import SchedulerStats, TokenOutput
from minisgl.scheduler.kv_manager import KVManager
from minisgl.scheduler.req import Req

logger = logging.getLogger(__name__)
_MASK63 = (1 << 63) - 1


class Scheduler:
    """Runs requests to completion on one Engine, one `step()` at a time.

    Each step is either a prefill (extend) batch of up to `chunked_prefill_size` new tokens taken from the
    waiting queue in order, or, when nothing can be prefilled, one decode token for every running request.
    When pages run out, unlocked cache entries are evicted first; then the newest running requests are
    retracted to the front of the queue and later recomputed from their tokens (output is unchanged,
    since sampling depends only on (seed, step)).
    """

    def __init__(self, config: EngineConfig, tp: TPInfo = TPInfo()):
        self.config = config
        self.tp = tp
        self.engine = Engine(config, tp)
        self.model_config = self.engine.model_config
        self.max_model_len = self.engine.max_model_len
        self.eos_ids = set(self.model_config.eos_token_ids)
        self.vocab_size = self.model_config.vocab_size
        ps = self.engine.page_size
        self.kv = KVManager(
            self.engine.pool.num_pages,
            ps,
            config.max_running_requests + 1,  # +1: a chunked prefill in progress holds a row too
            -(-self.max_model_len // ps),
            self.engine.device,
            radix=not config.disable_radix_cache,
        )
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self._aborted: list[Req] = []
        self._rng = random.Random(config.seed)
        self._stats = SchedulerStats()

    # ---- requests in and out -------------------------------------------------------------------
    def add_request(self, rid: str, input_ids: list[int], params: SamplingParams) -> None:
        """Queue a request (n samples). Raises ValueError if it can never run."""
        params.validate()
        if not input_ids:
            raise ValueError("the prompt is empty")
        if min(input_ids) < 0 or max(input_ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(input_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(input_ids)} tokens; the context length is {self.max_model_len} and at least "
                "one token must be generated"
            )
        if self.kv.pages_for(len(input_ids) + 1) > self.kv.capacity:
            raise ValueError(f"prompt of {len(input_ids)} tokens does not fit in the KV pool")
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        max_len = min(self.max_model_len, len(input_ids) + params.max_tokens)
        first: Req | None = None
        for i in range(params.n):
            seed = base_seed if i == 0 else (base_seed * 0x9E3779B97F4A7C15 + i) & _MASK63
            req = Req(rid, i, list(input_ids), params, seed, max_len)
            if first is not None and not self.config.disable_radix_cache:
                req.wait_for = first  # share the prompt's KV once the first sample has computed it
            first = first or req
            self.waiting.append(req)
        self._stats.prompt_tokens_total += len(input_ids) * params.n

    def abort(self, rid: str, index: int | None = None) -> None:
        """End every sample of `rid` (or only sample `index`); each yields a final "abort" output."""
        for queue in (self.waiting, self.running):
            for req in [r for r in queue if r.rid == rid and index in (None, r.index)]:
                queue.remove(req)
                self.kv.release(req)
                req.finish_reason = "abort"
                self._aborted.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._aborted)

    def stats(self) -> SchedulerStats:
        s = self._stats
        s.num_running_reqs = len(self.running)
        s.num_queue_reqs = len(self.waiting)
        s.token_usage = self.kv.used_pages / max(1, self.kv.capacity)
        s.cache_hit_rate = s.extra.get("cached_tokens", 0) / max(1, s.prompt_tokens_total)
        return s

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[TokenOutput]:
        outputs = [TokenOutput(r.rid, r.index, [], True, "abort") for r in self._aborted]
        self._aborted.clear()
        scheduled = self._schedule_prefill()
        if scheduled:
            outputs += self._run(ForwardMode.EXTEND, *scheduled)
        elif self.running:
            reqs = self._schedule_decode()
            outputs += self._run(ForwardMode.DECODE, reqs, [1] * len(reqs))
        return outputs

    def _schedule_prefill(self) -> tuple[list[Req], list[int]] | None:
        budget = self.config.chunked_prefill_size
        # Keep a page per running request in hand so admitting new work does not force a retraction next step.
        reserve = len(self.running)
        reqs: list[Req] = []
        lens: list[int] = []
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) + len(reqs) >= self.config.max_running_requests:
                break
            if req.wait_for is not None and not req.wait_for.prefilled and not req.wait_for.finished:
                continue
            if req.row < 0:
                if not self._can_admit(req, reserve):
                    break
                self.kv.admit(req)
                if not req.admitted:
                    req.admitted = True
                    req.num_cached_prompt = min(req.num_computed, len(req.prompt_ids))
                    self._stats.extra["cached_tokens"] = self._stats.extra.get("cached_tokens", 0) + req.num_cached_prompt
            n = min(req.seq_len - req.num_computed, budget)
            if self.kv.available_pages - self._pages_needed(req, n) < reserve or not self.kv.reserve(req, req.num_computed + n):
                break
            reqs.append(req)
            lens.append(n)
            budget -= n
            reserve += 1
        return (reqs, lens) if reqs else None

    def _can_admit(self, req: Req, reserve: int) -> bool:
        return self.kv.available_pages - reserve >= 1

    def _pages_needed(self, req: Req, n: int) -> int:
        return max(0, self.kv.pages_for(req.num_computed + n) - len(req.pages))

    def _schedule_decode(self) -> list[Req]:
        """Every running request gets a slot for its next token; retract the newest ones until that fits."""
        while True:
            need = sum(self._pages_needed(r, 1) for r in self.running)
            if need <= self.kv.available_pages or len(self.running) == 1:
                break
            victim = self.running.pop()
            logger.info("KV pool full: retracting request %s (%d tokens)", victim.rid, victim.seq_len)
            self.kv.release(victim)
            self.waiting.appendleft(victim)
            self._stats.extra["retractions"] = self._stats.extra.get("retractions", 0) + 1
        for r in self.running:
            if not self.kv.reserve(r, r.num_computed + 1):
                raise RuntimeError("KV pool cannot hold a single request; raise max_total_tokens")
        return list(self.running)

    # ---- run the model and account for the result ---------------------------------------------------
    def _run(self, mode: ForwardMode, reqs: list[Req], lens: list[int]) -> list[TokenOutput]:
        done = [r.num_computed + n >= r.seq_len for r, n in zip(reqs, lens)]
        batch = make_forward_batch(mode, reqs, lens, done, self.kv.page_table, self.kv.page_size)
        logits = self.engine.forward(batch)
        for r, n in zip(reqs, lens):
            r.num_computed += n
        sampled = [r for r, d in zip(reqs, done) if d]
        if mode is ForwardMode.EXTEND:
            for r, d in zip(reqs, done):
                if d:
                    self.waiting.remove(r)
                    self.running.append(r)
                    if r.index == 0 and r.params.n > 1:
                        self.kv.cache_progress(r)
        if not sampled:
            return []
        result = self._sample(logits, sampled)
        return self._append_tokens(sampled, result)

    def _sample(self, logits: torch.Tensor, reqs: list[Req]):
        sb = SamplingBatch.build(
            [r.params for r in reqs],
            [r.seed for r in reqs],
            [len(r.output_ids) for r in reqs],
            [r.prompt_ids for r in reqs],
            [r.output_ids for r in reqs],
            self.vocab_size,
            logits.device,
        )
        result = sample(logits, sb)
        if self.tp.size > 1:  # every rank continues with rank 0's tokens, whatever rounding did elsewhere
            dist.broadcast(result.token_ids, src=0)
        return result

    def _append_tokens(self, reqs: list[Req], result) -> list[TokenOutput]:
        tokens = result.token_ids.tolist()
        logprobs = result.logprobs.tolist() if result.logprobs is not None else None
        top_ids = result.top_ids.tolist() if result.top_ids is not None else None
        top_lps = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        outputs = []
        for i, (req, tok) in enumerate(zip(reqs, tokens)):
            req.output_ids.append(tok)
            self._stats.generation_tokens_total += 1
            out = TokenOutput(req.rid, req.index, [tok], prompt_tokens=len(req.prompt_ids))
            out.cached_tokens = req.num_cached_prompt
            if req.params.logprobs and logprobs is not None:
                out.logprobs = [logprobs[i]]
                k = req.params.top_logprobs
                out.top_logprobs = [list(zip(top_ids[i][:k], top_lps[i][:k]))] if k and top_ids else [[]]
            reason = self._finish_reason(req, tok)
            if reason:
                req.finish_reason = out.finish_reason = reason
                out.finished = True
                self.running.remove(req)
                self.kv.release(req)
            outputs.append(out)
        return outputs

    def _finish_reason(self, req: Req, tok: int) -> str | None:
        p = req.params
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_ids):
            return "stop"
        if len(req.output_ids) >= p.max_tokens or req.seq_len >= req.max_len:
            return "length"
        return None
