"""Data parallelism (`--dp N`): N independent replicas of the server behind sglang-router.

Each replica is a whole server (scheduler, tokenizer, API process) on a private port of 127.0.0.1, with its
own GPU(s) (CUDA_VISIBLE_DEVICES) or its own share of the CPU cores (sched_setaffinity, OMP_NUM_THREADS).
sglang-router, SGLang's Rust router, listens on the public host and port and sends each request to a
replica; its cache-aware policy keeps requests that share a prefix on the replica that holds it in cache.
The launcher (launch.py) starts and supervises all of it; this module only plans and runs the router.

Importing this module must stay cheap (no torch, no router): the launcher imports it for every server.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from minisgl.server.args import ServerArgs

logger = logging.getLogger("minisgl.launch")

ROUTER_READY_TIMEOUT_S = 120.0
# The router logs every request and registration step at info: it speaks up only from warnings unless debugging.
_ROUTER_LOG_LEVELS = {"debug": "info", "info": "warn", "warning": "warn", "error": "error"}
_ROUTER_GRACE_S = 2  # its own drain on SIGTERM; must end before the launcher's grace period (launch.GRACE_S)


@dataclass
class Replica:
    rank: int
    port: int
    args: ServerArgs  # the replica's own flags: private host and port, dp 1, dp_rank = rank
    env: dict[str, str]  # set in its processes' environment (CUDA_VISIBLE_DEVICES or OMP_NUM_THREADS)
    cpus: list[int] | None  # CPU affinity of its processes (CPU serving only)
    where: str  # for the log: "GPU 2" / "CPUs 0-7"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def check_router_installed() -> None:
    if importlib.util.find_spec("sglang_router") is None:
        raise SystemExit("--dp needs sglang-router in front of the replicas: pip install 'minisgl[router]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _span(cpus: list[int]) -> str:
    return f"CPUs {cpus[0]}-{cpus[-1]}" if cpus == list(range(cpus[0], cpus[-1] + 1)) else f"CPUs {cpus}"


def plan_replicas(args: ServerArgs) -> list[Replica]:
    """Where each of the args.dp replicas runs. CUDA: args.tp consecutive visible GPUs each. CPU: the cores
    this process may use, split into args.dp contiguous shares (the first ones get one more if uneven)."""
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    replicas = []
    if device.startswith("cuda"):
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        need = args.dp * args.tp
        if len(gpus) < need:
            raise SystemExit(f"--dp {args.dp} x --tp {args.tp} needs {need} GPUs, {len(gpus)} are visible")
        for r in range(args.dp):
            mine = gpus[r * args.tp : (r + 1) * args.tp]
            replicas.append(
                Replica(r, 0, args, {"CUDA_VISIBLE_DEVICES": ",".join(mine)}, None, f"GPU {','.join(mine)}")
            )
    else:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < args.dp:
            raise SystemExit(
                f"--dp {args.dp} on the CPU needs at least {args.dp} cores, this process may use {len(cpus)}"
            )
        base, extra = divmod(len(cpus), args.dp)
        start = 0
        for r in range(args.dp):
            mine = cpus[start : start + base + (r < extra)]
            start += len(mine)
            env = {"OMP_NUM_THREADS": str(len(mine)), "MKL_NUM_THREADS": str(len(mine))}
            replicas.append(Replica(r, 0, args, env, mine, _span(mine)))
    for r in replicas:
        r.port = _free_port()
        r.args = dataclasses.replace(args, host="127.0.0.1", port=r.port, dp=1, dp_rank=r.rank)
    return replicas


def _router_child_setup() -> None:
    """In the router's process before exec: ignore Ctrl-C (the launcher decides the order) and die with
    the launcher (PR_SET_PDEATHSIG), like every other child."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
    except OSError:
        pass


class Router:
    """sglang-router as a child process of the launcher, on the public host and port."""

    def __init__(self, args: ServerArgs, replicas: list[Replica]):
        self.args = args
        self.replicas = replicas
        self.proc: subprocess.Popen | None = None
        self.sentinel: int = -1  # a pidfd: readable once the router exits (multiprocessing.connection.wait)

    def command(self) -> list[str]:
        a = self.args
        cmd = [
            sys.executable,
            "-m",
            "sglang_router.launch_router",
            "--worker-urls",
            *[r.url for r in self.replicas],
            "--policy",
            a.router_policy,
            "--host",
            a.host,
            "--port",
            str(a.port),
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(_free_port()),
            "--log-level",
            _ROUTER_LOG_LEVELS[a.log_level],
            "--worker-startup-check-interval",
            "1",
            "--shutdown-grace-period-secs",
            str(_ROUTER_GRACE_S),
        ]
        if a.api_key:
            cmd += ["--api-key", a.api_key]
        return cmd

    def start(self, died: Callable[[], bool]) -> bool:
        """Start the router and wait until it forwards requests; False if it (or, per `died`, a replica)
        exits first or it is not ready in time."""
        cmd = self.command()
        logger.info("starting sglang-router: %s", " ".join(cmd))
        self.proc = subprocess.Popen(cmd, preexec_fn=_router_child_setup)
        self.sentinel = os.pidfd_open(self.proc.pid)
        host = "127.0.0.1" if self.args.host in ("0.0.0.0", "::", "") else self.args.host
        url = f"http://{host}:{self.args.port}/v1/models"  # answered by a replica: the route works
        headers = {"Authorization": f"Bearer {self.args.api_key}"} if self.args.api_key else {}
        deadline = time.monotonic() + ROUTER_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                logger.error("sglang-router exited with %s before it was ready", self.proc.returncode)
                return False
            if died():
                return False
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        logger.error("sglang-router did not route requests within %.0fs", ROUTER_READY_TIMEOUT_S)
        return False

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def processes(self) -> list[psutil.Process]:
        """The router and whatever it started, for the launcher's teardown."""
        if self.proc is None:
            return []
        try:
            p = psutil.Process(self.proc.pid)
            return [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1
