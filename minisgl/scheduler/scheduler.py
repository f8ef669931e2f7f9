"""Continuous batching: admit, prefill in chunks, decode, retract under memory pressure, finish."""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from minisgl.core import settings
from minisgl.core.forward_batch import ForwardMode
from minisgl.core.transfer import to_device
from minisgl.engine.engine import Engine
from minisgl.engine.sampling import PendingTokens, SamplingBatch
from minisgl.grammar import GrammarBackend, GrammarCompiler, GrammarError, GrammarSpec
from minisgl.sampling_params import SamplingParams
from minisgl.scheduler import prompt_logprobs
from minisgl.scheduler.batch import make_forward_batch
from minisgl.scheduler.grammar import GrammarQueue, Verdict
from minisgl.scheduler.io import SchedulerStats, TokenOutput
from minisgl.scheduler.kv_manager import KVManager
from minisgl.scheduler.req import Req, check_prompt, samples

logger = logging.getLogger(__name__)
GRAMMAR_TIMEOUT_S = 60.0  # a grammar still compiling after this long fails its request


@dataclass
class _Forward:
    """A step whose forward is launched and whose logits wait to be sampled."""

    batch: object
    reqs: list[Req]  # the rows that produce a token
    all_rows: bool  # every request of the batch produces one
    logits: torch.Tensor


@dataclass
class _Launched:
    """A step whose tokens are sampled on the device but not yet read by the host."""

    reqs: list[Req]
    tokens: PendingTokens
    verdicts: list[Verdict | None] | None = None  # the grammars' verdicts on the tokens, once collected


class Scheduler:
    """Runs requests to completion on one Engine, one `step()` at a time.

    Each step is either a prefill (extend) batch of up to `chunked_prefill_size` new tokens taken from the
    waiting queue in order, or, when nothing can be prefilled, one decode token for every running request.
    While a prompt is part-way through its chunked prefill, its chunks alternate with decode steps, so running
    requests keep streaming through a long prompt's prefill instead of waiting for all of it.
    When pages run out, unlocked cache entries are evicted first; then the newest running requests are
    retracted to the front of the queue and later recomputed from their tokens (output is unchanged,
    since sampling depends only on (seed, step)).

    Overlap scheduling: a step launches its batch (forward and sampling are queued on the device) and only
    then reads the previous step's tokens, so the host's bookkeeping runs while the device computes. This
    works because a decode step takes its input tokens from `token_buf` (the last sampled token of each
    page-table row, on the device), never from the host. A request therefore may have one `pending` token
    the host has not seen; one found finished late has that extra token discarded. Anything that needs the
    host's view to be exact (retraction, penalties, aborts) first drains the step in flight.

    Grammars: a constrained request waits in the grammar queue until its grammar compiles (on a thread
    pool), then queues like any other. A batch with constrained rows is sampled only once the previous
    step's tokens have advanced their matchers (each accepting its token, then filling the mask of the next):
    the mask needs the previous token, the forward does not, so the forward still overlaps. On a GPU
    (`grammar_overlap`) the matchers advance on the grammar queue's thread, begun before the launch.
    """

    def __init__(self, engine: Engine):
        """`engine` is this rank's model runner, loaded; the scheduler reads its config, pool size, device and
        prefill chunk size, and calls only its `forward`."""
        self.engine = engine
        self.config = config = engine.config
        self.tp = engine.tp
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
        self.token_buf = torch.zeros(config.max_running_requests + 1, dtype=torch.int64, device=self.engine.device)
        self.overlap = not (config.disable_overlap_schedule or settings.overlap_disabled())
        # On a GPU the grammar's host work runs on its own thread beside the launch; on the CPU that thread
        # would take a core from the forward's kernel threads, so there it runs between forwards.
        self.grammar_overlap = self.overlap and torch.device(self.engine.device).type == "cuda"
        self._inflight: _Launched | None = None
        self._decode_next = False  # the last step left a prompt part-way through its prefill
        self._ready: list[TokenOutput] = []  # outputs drained outside step(), returned by the next one
        self.grammars: GrammarQueue | None = None

    def enable_grammar(self, make_backend: Callable[[], GrammarBackend], timeout: float = GRAMMAR_TIMEOUT_S) -> None:
        """Accept constrained requests; `make_backend` builds the grammar backend (on the compile pool)."""
        rows = self.token_buf.shape[0]
        self.grammars = GrammarQueue(GrammarCompiler(make_backend), timeout, rows, self.token_buf.device)

    # ---- requests in and out -------------------------------------------------------------------
    def add_request(self, rid: str, input_ids: list[int], params: SamplingParams) -> None:
        """Queue a request (n samples). Raises ValueError if it can never run."""
        check_prompt(input_ids, params, self.vocab_size, self.max_model_len)
        if self.kv.pages_for(len(input_ids) + 1) > self.kv.capacity:
            raise ValueError(f"prompt of {len(input_ids)} tokens does not fit in the KV pool")
        spec = None
        if params.grammar is not None:
            if self.tp.size > 1:
                raise ValueError("structured output needs --tp 1 (ranks would compile grammars at different steps)")
            if self.grammars is None:
                raise ValueError("structured output is disabled on this server (--grammar-backend none)")
            try:
                spec = GrammarSpec(*params.grammar)
            except GrammarError as e:
                raise ValueError(str(e)) from None
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        max_len = min(self.max_model_len, len(input_ids) + params.max_tokens)
        reqs = samples(rid, input_ids, params, base_seed, max_len, share_prompt=not self.config.disable_radix_cache)
        if spec is not None:
            self.grammars.add(reqs, spec)
        else:
            self.waiting.extend(reqs)
        self._stats.prompt_tokens_total += len(input_ids) * params.n

    def abort(self, rid: str, index: int | None = None) -> None:
        """End every sample of `rid` (or only sample `index`); each yields a final "abort" output."""
        self._ready += self._drain()  # the host's view of every request must be exact before releasing KV
        for req in self.grammars.abort(rid, index) if self.grammars is not None else []:
            req.finish_reason = "abort"
            self._aborted.append(req)
        for queue in (self.waiting, self.running):
            for req in [r for r in queue if r.rid == rid and index in (None, r.index)]:
                queue.remove(req)
                self.kv.release(req)
                req.finish_reason = "abort"
                self._aborted.append(req)

    def flush_cache(self) -> bool:
        """Drop every prefix-cache entry and free its pages; only when no request holds or awaits pages
        (False, nothing done, otherwise)."""
        if self.has_work():
            return False
        self.kv.allocator.free(self.kv.cache.evict(self.kv.cache.num_pages))
        self.kv.check_no_leaks()
        return True

    def has_work(self) -> bool:
        queued = self.waiting or self.running or self._aborted or self._inflight or self._ready
        return bool(queued or (self.grammars is not None and len(self.grammars) > 0))

    def shutdown(self) -> None:
        """Nothing to stop: the engine lives in this process (`TPScheduler.shutdown` stops its ranks)."""

    def stats(self) -> SchedulerStats:
        s = self._stats
        s.num_running_reqs = len(self.running)
        s.num_queue_reqs = len(self.waiting) + (self.grammars.num_reqs() if self.grammars is not None else 0)
        s.token_usage = self.kv.used_pages / max(1, self.kv.capacity)
        s.cache_hit_rate = s.extra.get("cached_tokens", 0) / max(1, s.prompt_tokens_total)
        return s

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[TokenOutput]:
        outputs, self._ready = self._ready, []
        outputs += [TokenOutput(r.rid, r.index, [], True, "abort") for r in self._aborted]
        self._aborted.clear()
        if self.grammars is not None and len(self.grammars):
            outputs += self._poll_grammars()
        if not self.overlap or self._needs_exact_state():
            outputs += self._drain()
        if self.grammar_overlap and self.grammars is not None and self._inflight is not None:
            self.grammars.begin_accept(self._inflight.reqs, self._inflight.tokens)  # overlaps the next two calls
        fwd = self._launch()
        launched = None
        if fwd is not None:
            sb = self._sampling_batch(fwd)
            if any(r.grammar is not None for r in fwd.reqs):
                outputs += self._drain()  # the masks need the previous tokens accepted
            launched = self._sample_launched(fwd, sb)
        outputs += self._drain()  # the previous step's tokens, read while this one runs
        self._inflight = launched
        if not self.overlap:
            outputs += self._drain()
        return outputs

    def _poll_grammars(self) -> list[TokenOutput]:
        if not (self.waiting or self.running or self._inflight):  # nothing else to do: do not spin
            self.grammars.wait(0.005)
        ready, failed = self.grammars.poll()
        self.waiting.extend(ready)
        return [TokenOutput(r.rid, r.index, [], True, "abort", error=msg, error_status=400) for r, msg in failed]

    def _drain(self) -> list[TokenOutput]:
        launched, self._inflight = self._inflight, None
        return self._process(launched) if launched is not None else []

    def _needs_exact_state(self) -> bool:
        """Penalties read the output tokens; retraction must release exact state. Both need a drain first."""
        if any(r.params.penalised for r in self.running):
            return True
        need = sum(self._pages_needed(r, 1) for r in self.running)
        return need > self.kv.available_pages

    def _schedule_prefill(self) -> tuple[list[Req], list[int]] | None:
        budget, rows = self.engine.chunked_prefill_size, prompt_logprobs.RowBudget()
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
                if self.kv.available_pages - reserve < 1:
                    break
                self.kv.admit(req)
                if not req.admitted:
                    req.admitted = True
                    req.num_cached_prompt = min(req.num_computed, len(req.prompt_ids))
                    self._stats.extra["cached_tokens"] = (
                        self._stats.extra.get("cached_tokens", 0) + req.num_cached_prompt
                    )
            n = rows.take(req, min(req.seq_len - req.num_computed, budget))
            if n == 0:
                continue
            if self.kv.available_pages - self._pages_needed(req, n) < reserve or not self.kv.reserve(
                req, req.num_computed + n
            ):
                break
            reqs.append(req)
            lens.append(n)
            budget -= n
            reserve += 1
        return (reqs, lens) if reqs else None

    def _pages_needed(self, req: Req, n: int) -> int:
        return max(0, self.kv.pages_for(req.num_computed + n) - req.num_pages)

    def _schedule_decode(self) -> list[Req]:
        """A slot for the next token of every running request that may still produce one. When that does not
        fit, take pages back: first from queued requests part-way through a chunked prefill, then by
        retracting the newest running requests (only ever with nothing in flight, see _needs_exact_state)."""
        while sum(self._pages_needed(r, 1) for r in self.running) > self.kv.available_pages:
            holders = [r for r in self.waiting if r.row >= 0]
            if holders:
                self.kv.release(holders[-1])
                continue
            if len(self.running) == 1:
                break
            victim = self.running.pop()
            logger.info("KV pool full: retracting request %s (%d tokens)", victim.rid, victim.seq_len)
            self.kv.release(victim)
            self.waiting.appendleft(victim)
            self._stats.extra["retractions"] = self._stats.extra.get("retractions", 0) + 1
        # A request whose in-flight token is its last (by length) needs no further step.
        reqs = [r for r in self.running if not self._done_by_length(r, r.pending)]
        for r in reqs:
            if not self.kv.reserve(r, r.num_computed + 1):
                raise RuntimeError("KV pool cannot hold a single request; raise max_total_tokens")
        return reqs

    # ---- launch a batch, then account for its tokens ---------------------------------------------
    def _launch(self) -> _Forward | None:
        reqs: list[Req] = []
        if self._decode_next and self.running:
            mode, reqs = ForwardMode.DECODE, self._schedule_decode()
        if not reqs:
            scheduled = self._schedule_prefill()
            if scheduled:
                mode, (reqs, lens) = ForwardMode.EXTEND, scheduled
            else:
                mode, reqs = ForwardMode.DECODE, self._schedule_decode() if self.running else []
        if mode is ForwardMode.DECODE:
            lens = [1] * len(reqs)
        if not reqs:
            return None
        done = [r.num_computed + n >= r.seq_len + r.pending for r, n in zip(reqs, lens)]
        self._decode_next = mode is ForwardMode.EXTEND and not all(done)
        prompt_rows = prompt_logprobs.wanted(reqs) if mode is ForwardMode.EXTEND else None
        batch = make_forward_batch(
            mode, reqs, lens, done, self.kv.page_table, self.kv.page_size, self.token_buf, prompt_rows
        )
        logits = self.engine.forward(batch)
        if prompt_rows is not None:
            prompt_logprobs.record(reqs, lens, prompt_rows, logits[sum(done) :])
            logits = logits[: sum(done)]
        for r, n in zip(reqs, lens):
            r.num_computed += n
        sampled = [r for r, d in zip(reqs, done) if d]
        if mode is ForwardMode.EXTEND:
            for r in sampled:
                self.waiting.remove(r)
                self.running.append(r)
                if r.index == 0 and r.params.n > 1:
                    self.kv.cache_progress(r)
        if not sampled:
            return None
        for r in sampled:  # counted now: draining the previous step must see this token as in flight
            r.pending += 1
        return _Forward(batch, sampled, len(sampled) == len(reqs), logits)

    def _sampling_batch(self, fwd: _Forward) -> SamplingBatch:
        """Built before the previous step's tokens are read (penalised batches read them first): `pending`
        still counts those tokens then, so each request's output count is the same either way."""
        reqs = fwd.reqs
        return SamplingBatch.build(
            [r.params for r in reqs],
            [r.seed for r in reqs],
            [len(r.output_ids) + r.pending - 1 for r in reqs],  # this step's token is already counted
            [r.prompt_ids for r in reqs],
            [r.output_ids for r in reqs],
            self.vocab_size,
            fwd.logits.device,
            self.eos_ids,
        )

    def _sample_launched(self, fwd: _Forward, sb: SamplingBatch) -> _Launched:
        reqs = fwd.reqs
        if fwd.all_rows:
            rows = fwd.batch.rows
        else:
            rows = to_device([r.row for r in reqs], torch.int64, self.token_buf.device)
        mask = self.grammars.token_mask(reqs, rows) if self.grammars is not None else None
        tokens = self.engine.sample(fwd.logits, sb, mask)
        self.token_buf[rows] = tokens.token_ids
        return _Launched(reqs, tokens)

    def _process(self, launched: _Launched) -> list[TokenOutput]:
        tokens, logprobs, top_ids, top_lps = launched.tokens.wait()
        if not self.grammar_overlap:
            self._verdicts(launched)  # on this thread, before the loop below finishes any of the requests
        outputs = []
        judged: list[tuple[int, Req, TokenOutput]] = []  # constrained rows still going: their grammar decides
        for i, (req, tok) in enumerate(zip(launched.reqs, tokens)):
            req.pending -= 1
            if req.finished:  # found finished a step late: this token is surplus; its KV may go now
                if req.pending == 0 and req.finish_reason != "abort":
                    self.kv.release(req)
                continue
            req.output_ids.append(tok)
            self._stats.generation_tokens_total += 1
            out = TokenOutput(req.rid, req.index, [tok], prompt_tokens=len(req.prompt_ids))
            out.cached_tokens = req.num_cached_prompt
            prompt_logprobs.attach(req, out)
            if req.params.logprobs and logprobs is not None:
                out.logprobs = [logprobs[i]]
                k = req.params.top_logprobs
                out.top_logprobs = [list(zip(top_ids[i][:k], top_lps[i][:k]))] if k and top_ids else [[]]
            reason = self._finish_reason(req, tok)
            if reason:
                self._finish(req, out, reason)
            elif req.grammar is not None:
                judged.append((i, req, out))
            outputs.append(out)
        # Asked last under grammar_overlap: the grammar thread has been advancing the matchers meanwhile.
        verdicts = self._verdicts(launched)
        for i, req, out in judged:
            if not verdicts[i].accepted:  # the mask allowed it, so this is a backend bug: end loudly
                logger.error("request %s: the grammar rejected sampled token %d", req.rid, tokens[i])
                out.error = "internal error: the grammar rejected a token it allowed"
                self._finish(req, out, "abort")
            elif verdicts[i].terminated:
                self._finish(req, out, "stop")
        return outputs

    def _finish(self, req: Req, out: TokenOutput, reason: str) -> None:
        req.finish_reason = out.finish_reason = reason
        out.finished = True
        self.running.remove(req)
        if req.pending == 0:
            self.kv.release(req)

    def _verdicts(self, launched: _Launched) -> list[Verdict | None] | None:
        """Advance the grammars by `launched`'s tokens (or collect the advance begun on the grammar thread)."""
        if launched.verdicts is None and self.grammars is not None:
            launched.verdicts = self.grammars.accept(launched.reqs, launched.tokens.wait().token_ids)
        return launched.verdicts

    def _done_by_length(self, req: Req, extra: int = 0) -> bool:
        return len(req.output_ids) + extra >= req.params.max_tokens or req.seq_len + extra >= req.max_len

    def _finish_reason(self, req: Req, tok: int) -> str | None:
        p = req.params
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_ids):
            return "stop"
        if self._done_by_length(req):
            return "length"
        return None
