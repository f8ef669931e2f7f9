"""The API server's side of the message path: sends requests to the tokenizer worker, routes replies back.

One `Job` is one HTTP request; it may cover several rids (a completions call with several prompts) of n
samples each, all feeding one asyncio queue. Invariants:
- a rid is registered from `submit` until `release`; replies for unregistered rids are dropped (they
  belong to requests already answered, timed out or abandoned);
- `release` aborts every rid with an unfinished sample, so the scheduler frees its KV whatever ended the
  job (finish, error, timeout, client gone, cancellation) and is idempotent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from minisgl.message import (
    AbortReq,
    FlushCacheResult,
    GenerateReq,
    IpcPaths,
    ModelInfo,
    ReqError,
    StatsMsg,
    StrOutput,
    StrOutputBatch,
    TokenizeResult,
    pack,
    unpack,
)
from minisgl.server.errors import APIError
from minisgl.server.metrics import Metrics

logger = logging.getLogger("minisgl.api")

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks whether its client is still there


class ClientGone(Exception):
    """The HTTP client disconnected; its request has been aborted."""


@dataclass
class Job:
    rids: list[str]
    n: int
    created: float = field(default_factory=time.monotonic)
    deadline: float | None = None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    unfinished: dict[str, int] = field(default_factory=dict)  # rid -> samples not finished yet
    # Metrics bookkeeping, updated as outputs arrive (the consumer of `queue` may lag behind).
    first_output: bool = True
    last_seen: dict[tuple[str, int], tuple[float, int]] = field(default_factory=dict)  # (time, tokens)
    arrived_unfinished: int = 0

    def __post_init__(self) -> None:
        self.unfinished = {rid: self.n for rid in self.rids}
        self.arrived_unfinished = len(self.rids) * self.n

    @property
    def done(self) -> bool:
        return not any(self.unfinished.values())


class EngineClient:
    def __init__(self, paths: IpcPaths, metrics: Metrics, request_timeout: float | None = None):
        self.paths = paths
        self.metrics = metrics
        self.request_timeout = request_timeout
        self.info: ModelInfo | None = None
        self.jobs: dict[str, Job] = {}
        self.calls: dict[str, asyncio.Future] = {}
        self._ids = itertools.count()
        self._prefix = f"{os.getpid():x}-"

    async def start(self) -> None:
        """Open the sockets and wait for ModelInfo (the model is loaded and the path works)."""
        self.actx = zmq.asyncio.Context()
        self.sock_in = self.actx.socket(zmq.PULL)
        self.sock_in.bind(self.paths.api)
        # Sends use a plain socket: PUSH never blocks here in practice, and a synchronous send also works
        # from a `finally` of a cancelled task (client disconnects), where awaiting is unreliable.
        self.sctx = zmq.Context()
        self.sock_out = self.sctx.socket(zmq.PUSH)
        self.sock_out.setsockopt(zmq.LINGER, 0)
        self.sock_out.connect(self.paths.tokenizer)
        while self.info is None:
            self._dispatch(unpack(await self.sock_in.recv()))
        self._task = asyncio.create_task(self._recv_loop())

    def close(self) -> None:
        self._task.cancel()
        self.sock_in.close(0)
        self.sock_out.close(0)

    def new_rid(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    def send(self, msg: Any) -> None:
        try:
            data = pack(msg)
        except (OverflowError, TypeError, ValueError) as e:  # a value the wire format cannot carry
            raise APIError(400, f"the request contains a value that cannot be processed: {e}") from e
        self.sock_out.send(data)

    # ---- generation ------------------------------------------------------------------------------
    def submit(self, reqs: list[GenerateReq], n: int) -> Job:
        job = Job([r.rid for r in reqs], n)
        if self.request_timeout is not None:
            job.deadline = job.created + self.request_timeout
        for r in reqs:
            self.jobs[r.rid] = job
        try:
            for r in reqs:
                self.send(r)
        except BaseException:
            self.release(job)
            raise
        return job

    def release(self, job: Job) -> None:
        for rid in job.rids:
            if self.jobs.pop(rid, None) is not None and job.unfinished.get(rid):
                self.sock_out.send(pack(AbortReq(rid)))

    def abort(self, rid: str) -> bool:
        """End `rid` for a client (POST /abort_request): the scheduler frees it, and its job gets a final
        "abort" output for each unfinished sample (the tokenizer drops the scheduler's own). False if unknown."""
        job = self.jobs.get(rid)
        if job is None or not job.unfinished.get(rid):
            return False
        self.sock_out.send(pack(AbortReq(rid)))
        job.queue.put_nowait(AbortReq(rid))
        return True

    async def events(self, job: Job, request: Any = None) -> AsyncIterator[StrOutput]:
        """Outputs of `job` until every sample has finished. Raises APIError for an error reply or the
        timeout, ClientGone when `request`'s client disconnects; the job is released in every case."""
        last_check = time.monotonic()
        finished: set[tuple[str, int]] = set()
        try:
            while not job.done:
                wait = DISCONNECT_POLL_S
                if job.deadline is not None:
                    left = job.deadline - time.monotonic()
                    if left <= 0:
                        raise APIError(
                            408,
                            f"the request did not finish within the server's request timeout of "
                            f"{self.request_timeout:g}s and was aborted",
                            code="request_timeout",
                        )
                    wait = min(wait, left)
                try:
                    ev = await asyncio.wait_for(job.queue.get(), wait)
                except asyncio.TimeoutError:  # not the builtin before Python 3.11
                    ev = None
                if request is not None and (ev is None or time.monotonic() - last_check > DISCONNECT_POLL_S):
                    last_check = time.monotonic()
                    if await request.is_disconnected():
                        raise ClientGone()
                if ev is None:
                    continue
                if isinstance(ev, ReqError):
                    raise APIError(ev.status, ev.message, ev.param, ev.code)
                if isinstance(ev, AbortReq):  # see abort(): already sent on; end what is still open
                    for i in range(job.n):
                        if (ev.rid, i) not in finished and job.unfinished.get(ev.rid):
                            finished.add((ev.rid, i))
                            job.unfinished[ev.rid] -= 1
                            yield StrOutput(ev.rid, i, "", True, "abort")
                    continue
                if (ev.rid, ev.index) in finished:  # a late output of an aborted sample
                    continue
                if ev.finished:
                    finished.add((ev.rid, ev.index))
                    job.unfinished[ev.rid] -= 1
                yield ev
        finally:
            self.release(job)

    # ---- /tokenize, /detokenize, /flush_cache --------------------------------------------------------------------
    async def call(self, msg: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self.calls[msg.rid] = fut
        try:
            self.send(msg)
            result = await asyncio.wait_for(fut, 60)
        except asyncio.TimeoutError:
            raise APIError(504, "the server's worker processes did not answer within 60s") from None
        finally:
            self.calls.pop(msg.rid, None)
        if isinstance(result, ReqError):
            raise APIError(result.status, result.message, result.param, result.code)
        return result

    # ---- replies --------------------------------------------------------------------------------------
    async def _recv_loop(self) -> None:
        while True:
            data = await self.sock_in.recv()
            try:
                self._dispatch(unpack(data))
            except Exception:  # one bad reply must not stop every other request's replies
                logger.exception("failed to handle a message from the tokenizer worker")

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, StrOutputBatch):
            now = time.monotonic()
            for out in msg.outputs:
                job = self.jobs.get(out.rid)
                if job is not None:
                    self._observe(job, out, now)
                    job.queue.put_nowait(out)
        elif isinstance(msg, ReqError):
            if msg.rid in self.calls:
                self.calls[msg.rid].set_result(msg)
            elif (job := self.jobs.get(msg.rid)) is not None:
                job.queue.put_nowait(msg)
        elif isinstance(msg, (TokenizeResult, FlushCacheResult)):
            fut = self.calls.get(msg.rid)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, StatsMsg):
            self.metrics.set_stats(msg.stats)
        elif isinstance(msg, ModelInfo):
            self.info = msg
        else:
            logger.error("unexpected message %r", type(msg).__name__)

    def _observe(self, job: Job, out: StrOutput, now: float) -> None:
        m = self.metrics
        if job.first_output:
            job.first_output = False
            m.ttft.observe(now - job.created)
        key = (out.rid, out.index)
        last = job.last_seen.get(key)
        if last is None:
            if not any(k[0] == out.rid for k in job.last_seen):  # the rid's first output: count its prompt once
                m.prompt_tokens.inc(out.prompt_tokens)
                m.cached_tokens.inc(out.cached_tokens)
            new = out.completion_tokens
        else:
            new = out.completion_tokens - last[1]
            if new > 0:
                m.itl.observe((now - last[0]) / new)
        if new > 0:
            m.generation_tokens.inc(new)
        job.last_seen[key] = (now, out.completion_tokens)
        if out.finished:
            job.arrived_unfinished -= 1
            if job.arrived_unfinished == 0:
                m.e2e.observe(now - job.created)
