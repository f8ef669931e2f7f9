"""The launcher: starts the serving processes, waits until they are ready, supervises, tears down.

    launcher (this process: supervises only)
      |- scheduler     loads the model, runs the batching loop (rank 0; TP ranks 1..N-1 are its children)
      |- tokenizer     tokenizes requests, detokenizes outputs, matches stop strings
      `- api server    FastAPI + uvicorn: HTTP in, JSON / server-sent events out

Ready handshake: the scheduler sends ModelInfo through the tokenizer to the API server once the model is
loaded; the API server starts accepting connections only after it has it, then reports ready here. So
"ready" means every process and every socket on the request path works.

With `--dp N` there are N such triples (replica r's processes are named `dp<r>.scheduler`, ...; OS names
`minisgl-sched<r>`, ...), each on its own private port, GPU(s) or share of the CPU cores, and sglang-router
(dataparallel.py) in front of them on the public port, started once every replica is ready.

Teardown invariant: whatever ends the launcher (SIGINT, SIGTERM, a child dying: any replica's process or
the router), every process it started, and their children, are terminated (then killed after a grace period)
before it exits; a child's death makes the exit status non-zero. Children ignore SIGINT (a terminal's Ctrl-C
reaches the whole process group) so the launcher alone decides the order, and they ask the kernel to kill
them if the launcher itself is killed.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import psutil

from minisgl.message import IpcPaths
from minisgl.server.args import ServerArgs
from minisgl.server.dataparallel import Replica

logger = logging.getLogger("minisgl.launch")

PROCESS_NAMES = {"scheduler": "minisgl-sched", "tokenizer": "minisgl-tok", "api": "minisgl-api"}  # OS names
GRACE_S = 5.0  # how long children get to exit after SIGTERM before SIGKILL
LOG_FORMAT = "[%(asctime)s %(processName)s] %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, datefmt="%H:%M:%S", force=True)


def _linux_process_setup(comm: str) -> None:
    """Linux: have the kernel SIGKILL this process when the launcher dies, even by SIGKILL; and name it
    (`comm`, at most 15 bytes) so ps, top and psutil tell the serving processes apart."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return  # not Linux: teardown by the launcher still covers every ordinary exit
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    libc.prctl(15, ctypes.c_char_p(comm.encode()[:15]))  # PR_SET_NAME


def _child_entry(
    name: str,
    log_level: str,
    launcher_pid: int,
    target: Callable,
    ready: Connection,
    args: tuple,
    comm: str | None = None,
    cpus: list[int] | None = None,
) -> None:
    """Runs first in every child: signals, logging, then the real entry point; a crash is logged in full."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _linux_process_setup(comm or PROCESS_NAMES.get(name, name))
    if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
        os._exit(1)
    if cpus:  # a --dp replica's share of the cores; OMP_NUM_THREADS (set by the launcher) sizes torch's pool
        os.sched_setaffinity(0, cpus)
    setup_logging(log_level)
    try:
        target(ready, *args)
    except Exception:
        logging.getLogger(f"minisgl.{name}").exception("%s process failed", name)
        sys.exit(1)


@dataclass
class _Child:
    name: str
    process: Any  # multiprocessing.Process (spawn context)
    ready: Connection
    is_ready: bool = False


class _Stop(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signum)


def _check_port(host: str, port: int) -> None:
    """Fail before loading the model, not after, when the port is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise SystemExit(f"cannot listen on {host}:{port}: {e.strerror}") from None


class Launcher:
    def __init__(self, args: ServerArgs):
        self.args = args
        self.ctx = mp.get_context("spawn")  # fork is unsafe with torch and zmq threads
        self.children: list[_Child] = []
        self.paths: list[IpcPaths] = []
        self.router: Any = None  # dataparallel.Router with --dp

    def _start(self, name: str, target: Callable, *args: Any, replica: Replica | None = None) -> None:
        reader, writer = self.ctx.Pipe(duplex=False)
        comm, cpus = None, None
        if replica is not None:
            comm, cpus = PROCESS_NAMES[name] + str(replica.rank), replica.cpus
            name = f"dp{replica.rank}.{name}"
        p = self.ctx.Process(
            target=_child_entry,
            name=name,
            args=(name, self.args.log_level, os.getpid(), target, writer, args, comm, cpus),
        )
        saved = dict(os.environ)
        os.environ.update(replica.env if replica is not None else {})  # a spawned child copies our environment
        try:
            p.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        writer.close()  # our copy: EOF on `reader` then means the child died
        self.children.append(_Child(name, p, reader))

    def _start_server(self, args: ServerArgs, model_path: str, replica: Replica | None = None) -> None:
        """One server's scheduler, tokenizer and API processes (one replica's, with --dp)."""
        from minisgl.server.api_server import api_main
        from minisgl.server.scheduler_process import scheduler_main
        from minisgl.tokenizer.worker import tokenizer_main

        paths = IpcPaths.create()
        self.paths.append(paths)
        # the HTTP and detokenizer processes started here work at every token: single-row decode may leave them a core
        engine_kwargs = {**args.engine_kwargs(), "model": model_path, "cpu_spare_core": True}
        self._start("scheduler", scheduler_main, engine_kwargs, paths, args.max_queued_requests, replica=replica)
        self._start(
            "tokenizer", tokenizer_main, model_path, args.tokenizer, paths, args.trust_remote_code, replica=replica
        )
        self._start("api", api_main, args, args.model_name(model_path), paths, replica=replica)

    def run(self) -> int:
        """Serve until a signal or a child's death; the process exit status."""
        from minisgl.models.hub import resolve_model_path
        from minisgl.server import dataparallel

        args = self.args
        old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if args.dp > 1:
                dataparallel.check_router_installed()
            _check_port(args.host, args.port)
            model_path = resolve_model_path(args.model)
            start = time.monotonic()
            if args.dp == 1:
                self._start_server(args, model_path)
            else:
                replicas = dataparallel.plan_replicas(args)
                for r in replicas:
                    logger.info("replica %d: http://127.0.0.1:%d, %s", r.rank, r.port, r.where)
                    self._start_server(r.args, model_path, r)
            if not self._supervise(until_ready=True):
                return 1
            if args.dp > 1:
                self.router = dataparallel.Router(args, replicas)
                if not self.router.start(self._died):
                    return 1
            behind = f" ({args.dp} replicas behind sglang-router, policy {args.router_policy})" if args.dp > 1 else ""
            logger.info(
                "ready in %.1fs: serving %s at http://%s:%d%s",
                time.monotonic() - start,
                args.model_name(model_path),
                args.host,
                args.port,
                behind,
            )
            self._supervise(until_ready=False)
            return 1
        except _Stop as stop:
            logger.info("received %s, shutting down", stop)
            return 0
        finally:
            for s in old:
                signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the teardown
            self.shutdown()
            for s, h in old.items():
                signal.signal(s, h)

    def _died(self) -> bool:
        """Whether a child has died (logged), without waiting."""
        dead = [c for c in self.children if not c.process.is_alive()]
        for c in dead[:1]:
            logger.error("%s process died (exit code %s); shutting down the server", c.name, c.process.exitcode)
        return bool(dead)

    def _supervise(self, until_ready: bool) -> bool:
        """Wait for ready reports (or forever); False when a child (or the router) died, which is logged."""
        while True:
            if until_ready and all(c.is_ready for c in self.children):
                return True
            waitables = [c.process.sentinel for c in self.children]
            waitables += [c.ready for c in self.children if not c.is_ready]
            if self.router is not None:
                waitables.append(self.router.sentinel)
            for obj in wait(waitables):
                if self.router is not None and obj == self.router.sentinel:
                    logger.error("sglang-router died (exit code %s); shutting down the server", self.router.poll())
                    return False
                child = next(c for c in self.children if obj in (c.ready, c.process.sentinel))
                if obj is child.ready:
                    try:
                        child.ready.recv()
                        child.is_ready = True
                        continue
                    except EOFError:
                        pass
                child.process.join(timeout=GRACE_S)
                logger.error(
                    "%s process died (exit code %s); shutting down the server", child.name, child.process.exitcode
                )
                return False

    def shutdown(self) -> None:
        """Terminate every child and grandchild; kill what is still alive after GRACE_S."""
        procs: list[psutil.Process] = []
        if self.router is not None:
            procs += self.router.processes()
        for c in self.children:
            try:
                parent = psutil.Process(c.process.pid)
                procs += parent.children(recursive=True)
            except (psutil.NoSuchProcess, ValueError, TypeError):
                pass
        for c in self.children:
            if c.process.is_alive():
                c.process.terminate()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        deadline = time.monotonic() + GRACE_S
        for c in self.children:
            c.process.join(timeout=max(0.0, deadline - time.monotonic()))
        _, alive = psutil.wait_procs(procs, timeout=max(0.0, deadline - time.monotonic()))
        for c in self.children:
            if c.process.is_alive():
                logger.warning("%s process did not exit; killing it", c.name)
                c.process.kill()
                c.process.join(timeout=GRACE_S)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=GRACE_S)
        for paths in self.paths:
            shutil.rmtree(paths.dir, ignore_errors=True)
        if self.router is not None:
            self.router.close()
        self.children.clear()


def launch_server(args: ServerArgs) -> int:
    mp.current_process().name = "launcher"
    setup_logging(args.log_level)
    return Launcher(args).run()
