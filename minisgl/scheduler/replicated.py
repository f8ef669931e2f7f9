"""Tensor-parallel scheduling: rank 0 decides, every rank runs the same batches.

Rank 0 owns the request queue. Before each step it broadcasts the commands it received since the last step
(new requests with their seeds fixed, aborts) over a gloo group; every rank applies them to its own
identical Scheduler and steps. Identical inputs make identical scheduling decisions, so no batch ever
crosses the wire, only requests. Sampled tokens are taken from rank 0 (see Scheduler) so floating-point
differences between ranks can never make their states diverge.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import multiprocessing as mp
import os
import threading
import time
from typing import Any

import torch.distributed as dist

from minisgl.distributed.group import free_port, init_tp, local_device
from minisgl.engine.config import EngineConfig
from minisgl.engine.engine import Engine
from minisgl.sampling_params import SamplingParams
from minisgl.scheduler.io import SchedulerHandle, SchedulerStats, TokenOutput
from minisgl.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)

_LEAVE_TIMEOUT = datetime.timedelta(seconds=30)


def _rank_config(config: EngineConfig, rank: int) -> EngineConfig:
    return dataclasses.replace(config, device=str(local_device(config.resolved_device(), rank)))


def _broadcast(obj: Any, tp) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=tp.cpu_group)
    return box[0]


def worker_main(config: EngineConfig, rank: int, init_addr: str) -> None:
    """Entry point of ranks 1..N-1: mirror rank 0's commands and step until told to stop."""
    logging.basicConfig(level=logging.WARNING, format=f"[tp{rank}] %(levelname)s %(message)s")
    config = _rank_config(config, rank)
    tp = init_tp(rank, config.tp_size, init_addr, config.resolved_device())
    scheduler = Scheduler(Engine(config, tp))
    _broadcast(None, tp)  # ready
    while True:
        commands = _broadcast(None, tp)
        if commands == "shutdown":
            break
        _apply(scheduler, commands)
        scheduler.step()
    _leave(tp)


def _leave(tp) -> None:
    """Tear down the group in step: every rank acknowledges the shutdown before any destroys its end.

    Without this, rank 0 (which also hosts the rendezvous store) could tear down while a peer was still
    reading the shutdown message; gloo then aborted the process at exit now and then.
    """
    dist.monitored_barrier(group=tp.cpu_group, timeout=_LEAVE_TIMEOUT)
    dist.destroy_process_group()


def _apply(scheduler: Scheduler, commands: list[tuple]) -> None:
    for cmd in commands:
        if cmd[0] == "add":
            scheduler.add_request(cmd[1], cmd[2], cmd[3])
        elif cmd[0] == "abort":
            scheduler.abort(cmd[1], cmd[2])
        elif cmd[0] == "flush":
            scheduler.flush_cache()


def node_ranks(config: EngineConfig) -> range:
    """The global ranks that run on this node: tp_size is spread evenly over nnodes."""
    if config.tp_size % config.nnodes:
        raise ValueError(f"tp size {config.tp_size} is not divisible by nnodes {config.nnodes}")
    per_node = config.tp_size // config.nnodes
    return range(config.node_rank * per_node, (config.node_rank + 1) * per_node)


def start_workers(config: EngineConfig, init_addr: str) -> list[mp.Process]:
    """Start this node's worker ranks (every rank of the node but global rank 0) as child processes."""
    ctx = mp.get_context("spawn")
    workers = [
        ctx.Process(target=worker_main, args=(config, r, init_addr), name=f"minisgl-tp{r}", daemon=True)
        for r in node_ranks(config)
        if r != 0
    ]
    for w in workers:
        w.start()
    return workers


def run_worker_node(config: EngineConfig) -> int:
    """Entry point of nodes 1..nnodes-1: run this node's ranks until rank 0 shuts them down.

    Returns 0 when every rank exited cleanly; as soon as one dies with an error the others are stopped and 1
    is returned, so a failed node is never left half-running.
    """
    if not config.dist_init_addr:
        raise ValueError("a worker node needs dist_init_addr (host:port of node 0)")
    workers = start_workers(config, config.dist_init_addr)
    while any(w.is_alive() for w in workers):
        if any(w.exitcode not in (None, 0) for w in workers):
            logger.error("a tensor-parallel rank of this node died; stopping the others")
            for w in workers:
                w.terminate()
            return 1
        time.sleep(0.5)
    return 0 if all(w.exitcode == 0 for w in workers) else 1


class TPScheduler:
    """Rank 0's Scheduler for a tensor-parallel group on this host: same interface as `Scheduler`.

    It starts ranks 1..N-1 as child processes and watches them: if one dies, this process exits non-zero
    at once (a peer stuck in a collective would otherwise hang forever).
    """

    def __init__(self, config: EngineConfig):
        if config.node_rank != 0:
            raise RuntimeError("the scheduler runs on node 0; other nodes run run_worker_node() only")
        init_addr = config.dist_init_addr or f"127.0.0.1:{free_port()}"
        if config.nnodes > 1 and not config.dist_init_addr:
            raise ValueError("multi-node tensor parallelism needs dist_init_addr (host:port of node 0)")
        self.workers = start_workers(config, init_addr)
        threading.Thread(target=self._watchdog, daemon=True).start()
        config0 = _rank_config(config, 0)
        self.tp = init_tp(0, config.tp_size, init_addr, config0.resolved_device())
        self.scheduler = Scheduler(Engine(config0, self.tp))
        self.model_config = self.scheduler.model_config
        self.max_model_len = self.scheduler.max_model_len
        self.engine = self.scheduler.engine
        self.grammars = None  # ranks would see a grammar ready at different steps: constrained requests refused
        self._pending: list[tuple] = []
        _broadcast(None, self.tp)  # every rank has loaded

    def _watchdog(self) -> None:
        while True:
            for w in self.workers:
                if w.exitcode is not None and w.exitcode != 0:
                    logger.error("tensor-parallel rank %s died (exit code %s); shutting down", w.name, w.exitcode)
                    os._exit(1)
            time.sleep(0.5)

    def add_request(self, rid: str, input_ids: list[int], params: SamplingParams) -> None:
        if params.seed is None:  # fix the seed here so every rank samples alike
            params = dataclasses.replace(params, seed=self.scheduler._rng.getrandbits(63))
        self.scheduler.add_request(rid, input_ids, params)  # raises before anything is sent
        self._pending.append(("add", rid, list(input_ids), params))

    def abort(self, rid: str, index: int | None = None) -> None:
        self.scheduler.abort(rid, index)
        self._pending.append(("abort", rid, index))

    def flush_cache(self) -> bool:
        if not self.scheduler.flush_cache():
            return False
        self._pending.append(("flush",))
        return True

    def step(self) -> list[TokenOutput]:
        commands, self._pending = self._pending, []
        _broadcast(commands, self.tp)
        return self.scheduler.step()

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    @property
    def vocab_size(self) -> int:
        return self.scheduler.vocab_size

    @property
    def kv(self):
        return self.scheduler.kv

    def shutdown(self) -> None:
        """Tell every rank to stop. Best effort: a peer that is already gone (the launcher may be
        terminating this node's ranks at the same moment) must not turn a clean exit into a crash."""
        if not dist.is_initialized():
            return
        try:
            _broadcast("shutdown", self.tp)
            _leave(self.tp)
            for w in self.workers:
                w.join(timeout=3)
        except Exception as e:  # noqa: BLE001
            logger.warning("tensor-parallel shutdown incomplete: %s", e)


def make_scheduler(config: EngineConfig) -> SchedulerHandle:
    """The scheduler for this config: a plain one, or rank 0 of a tensor-parallel group."""
    if config.tp_size > 1:
        return TPScheduler(config)
    return Scheduler(Engine(config))
