"""The scheduler process: owns the engine and runs the continuous-batching loop.

With tensor parallelism this is rank 0: `make_scheduler` starts ranks 1..N-1 as its own children and
replicates every command to them, so only this process talks to the rest of the server.

Loop invariant: messages are drained without blocking before every step while there is work, so a new
request or an abort waits at most one step; with no work the loop blocks on its inbox (waking once a second
to publish stats), so an idle server costs no CPU.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from typing import Any

import zmq

from minisgl.message import (
    AbortReq,
    FlushCacheReq,
    FlushCacheResult,
    IpcPaths,
    ModelInfo,
    ReqError,
    StatsMsg,
    TokenizedGenerateReq,
    TokenOutputBatch,
    inbox,
    outbox,
    recv,
    send,
)
from minisgl.scheduler.io import SchedulerHandle

logger = logging.getLogger("minisgl.scheduler")

STATS_INTERVAL_S = 0.5  # how often busy-time gauges reach /metrics
LOG_INTERVAL_S = 10.0  # the throughput log line, while busy


class SchedulerLoop:
    """Feeds one scheduler from a ZeroMQ inbox and sends its outputs on. `max_queued` bounds the waiting
    queue: a request beyond it is refused with a 503 instead of waiting indefinitely."""

    def __init__(
        self, scheduler: SchedulerHandle, sock_in: zmq.Socket, sock_out: zmq.Socket, max_queued: int | None = None
    ):
        self.scheduler = scheduler
        self.sock_in = sock_in
        self.sock_out = sock_out
        self.max_queued = max_queued
        self._last_stats = 0.0
        self._last_log = time.monotonic()
        self._log_tokens = scheduler.stats().generation_tokens_total
        self._was_busy = False

    def run_forever(self) -> None:
        while True:
            self.run_once()

    def run_once(self) -> None:
        if not self.scheduler.has_work():
            if not self.sock_in.poll(1000):  # idle: sleep in the kernel until a message comes
                self._publish_stats(force=self._was_busy)
                self._was_busy = False
                return
        self._drain()
        outputs = self.scheduler.step()
        if outputs:
            send(self.sock_out, TokenOutputBatch(outputs))
        busy = self.scheduler.has_work()
        self._publish_stats(force=self._was_busy and not busy)  # the idle state is reported at once
        if busy and not self._was_busy:  # the throughput window starts with the work, not at the last log
            self._last_log, self._log_tokens = time.monotonic(), self.scheduler.stats().generation_tokens_total
        self._was_busy = busy
        if busy:
            self._maybe_log()

    def _drain(self) -> None:
        while (msg := recv(self.sock_in, block=False)) is not None:
            if isinstance(msg, TokenizedGenerateReq):
                self._add(msg)
            elif isinstance(msg, AbortReq):
                if msg.index is None:
                    self.scheduler.abort(msg.rid)
                else:  # one sample ended by a stop string; its siblings go on
                    self.scheduler.abort(msg.rid, msg.index)
            elif isinstance(msg, FlushCacheReq):
                self._flush(msg)
            else:
                logger.error("unexpected message %r", type(msg).__name__)

    def _add(self, msg: TokenizedGenerateReq) -> None:
        if self.max_queued is not None and self.scheduler.stats().num_queue_reqs >= self.max_queued:
            send(
                self.sock_out,
                ReqError(
                    msg.rid,
                    f"the server is overloaded: {self.max_queued} requests are already queued; retry later",
                    503,
                    code="server_overloaded",
                ),
            )
            return
        try:
            self.scheduler.add_request(msg.rid, msg.input_ids, msg.params)
        except ValueError as e:  # can never run (e.g. longer than the KV pool): the client's problem
            send(self.sock_out, ReqError(msg.rid, str(e), 400))

    def _flush(self, msg: FlushCacheReq) -> None:
        s = self.scheduler.stats()
        busy = s.num_running_reqs + s.num_queue_reqs
        if busy or not self.scheduler.flush_cache():
            send(
                self.sock_out,
                FlushCacheResult(
                    msg.rid, False, f"the cache was not flushed: {busy or 'some'} requests are queued or running"
                ),
            )
            return
        logger.info("prefix cache flushed")
        send(self.sock_out, FlushCacheResult(msg.rid, True, "Cache flushed."))

    def _publish_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_stats >= STATS_INTERVAL_S:
            self._last_stats = now
            send(self.sock_out, StatsMsg(self.scheduler.stats()))

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log < LOG_INTERVAL_S:
            return
        s = self.scheduler.stats()
        tokens = s.generation_tokens_total - self._log_tokens
        logger.info(
            "gen throughput %.1f tok/s, running %d, queued %d, KV usage %.1f%%, cache hit rate %.1f%%",
            tokens / (now - self._last_log),
            s.num_running_reqs,
            s.num_queue_reqs,
            100 * s.token_usage,
            100 * s.cache_hit_rate,
        )
        self._last_log, self._log_tokens = now, s.generation_tokens_total


def scheduler_main(ready: Any, engine_kwargs: dict, paths: IpcPaths, max_queued: int | None = None) -> None:
    """Process entry point: load the model, announce it, then loop until killed."""
    from minisgl.engine.config import EngineConfig
    from minisgl.scheduler.replicated import make_scheduler

    config = EngineConfig(**engine_kwargs)
    scheduler = make_scheduler(config)
    if config.grammar_backend != "none" and config.tp_size == 1:
        scheduler.enable_grammar(_grammar_backend_factory(config, scheduler))
    ctx = zmq.Context()
    sock_in = inbox(ctx, paths.scheduler)
    sock_out = outbox(ctx, paths.tokenizer)
    mc = scheduler.model_config
    send(
        sock_out,
        ModelInfo(
            engine_kwargs["model"] or "", serving_context_length(scheduler), mc.vocab_size, list(mc.eos_token_ids)
        ),
    )
    ready.send("scheduler")
    # SIGTERM (the launcher shutting down) unwinds the loop so a tensor-parallel group is told to stop:
    # ranks on other nodes are not our children and would otherwise see only a broken connection.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        SchedulerLoop(scheduler, sock_in, sock_out, max_queued).run_forever()
    finally:
        scheduler.shutdown()


def serving_context_length(scheduler: SchedulerHandle) -> int:
    """The longest prompt + completion the server accepts: the model's (or --context-length), and no more
    than the KV pool holds, since a lone request that outgrows the pool cannot be retracted to make room."""
    context = scheduler.max_model_len
    pool_tokens = scheduler.kv.capacity * scheduler.kv.page_size
    if pool_tokens < context:
        logger.info(
            "the KV pool holds %d tokens, fewer than the context length %d: requests are limited to %d "
            "(--max-total-tokens sizes the pool)",
            pool_tokens,
            context,
            pool_tokens,
        )
    return min(context, pool_tokens)


def _grammar_backend_factory(config: Any, scheduler: Any) -> Any:
    """Builds the grammar backend on first use (on the compile pool): it needs the tokenizer's vocabulary."""
    from minisgl.grammar import create_backend
    from minisgl.tokenizer import load_tokenizer

    mc = scheduler.model_config
    path = scheduler.engine.model_path

    def make() -> Any:
        tokenizer = load_tokenizer(path, config.tokenizer, config.trust_remote_code)
        return create_backend(config.grammar_backend, tokenizer, mc.vocab_size, list(mc.eos_token_ids))

    return make
