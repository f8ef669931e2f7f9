"""Setting up the tensor-parallel process group (NCCL on CUDA, gloo on CPU)."""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist

from minisgl.distributed.info import TPInfo

# Control messages wait for rank 0 as long as the server is idle; a dead peer still errors at once (gloo sees
# the closed socket) and the process watchdog covers NCCL.
_CONTROL_TIMEOUT = datetime.timedelta(days=7)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_tp(rank: int, size: int, init_addr: str, device: torch.device) -> TPInfo:
    """Join the group of `size` ranks that rendezvous at `init_addr` (host:port)."""
    if device.type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://{init_addr}", rank=rank, world_size=size, timeout=datetime.timedelta(minutes=10)
    )
    cpu_group = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT) if backend != "gloo" else dist.group.WORLD
    return TPInfo(rank, size, cpu_group)


def local_device(device: torch.device, rank: int) -> torch.device:
    if device.type == "cuda":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return device
