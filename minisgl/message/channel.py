"""ZeroMQ plumbing: where each process listens, and typed send/receive on top of codec.py.

Each process binds one PULL socket (its inbox) and connects PUSH sockets to the inboxes it writes to.
PUSH/PULL keeps per-pair ordering, which the protocol relies on: an AbortReq never overtakes the request it
aborts, because both travel the same API server -> tokenizer worker -> scheduler path.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import zmq

from minisgl.message.codec import pack, unpack


@dataclass(frozen=True)
class IpcPaths:
    """ipc:// endpoints of the three inboxes, all inside one private temp dir."""

    api: str
    tokenizer: str
    scheduler: str

    @staticmethod
    def create(root: str | None = None) -> IpcPaths:
        # ipc paths are limited to ~100 bytes, so keep the dir short and under /tmp.
        d = root or tempfile.mkdtemp(prefix="minisgl-", dir="/tmp" if os.path.isdir("/tmp") else None)
        return IpcPaths(*(f"ipc://{os.path.join(d, name)}" for name in ("api", "tok", "sched")))

    @property
    def dir(self) -> str:
        return os.path.dirname(self.api[len("ipc://") :])


def inbox(ctx: zmq.Context, addr: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PULL)
    sock.bind(addr)
    return sock


def outbox(ctx: zmq.Context, addr: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)  # a dead peer must not keep this process from exiting
    sock.connect(addr)
    return sock


def send(sock: zmq.Socket, msg: Any) -> None:
    sock.send(pack(msg))


def recv(sock: zmq.Socket, block: bool = True) -> Any | None:
    """The next message, or None when `block` is False and nothing is waiting."""
    try:
        return unpack(sock.recv(0 if block else zmq.NOBLOCK))
    except zmq.Again:
        return None
