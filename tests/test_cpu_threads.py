"""CPU kernel threads share the machine: short OpenMP spins unless the user chose otherwise, --cpu-threads."""

from __future__ import annotations

import os

import torch
from checkpoints import build_checkpoint

from minisgl import LLM
from minisgl.core.cpu_threads import SPIN_COUNT, default_threads, use_short_spins
from minisgl.server.args import parse_args


def test_short_spins_unless_the_user_chose(monkeypatch):
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        monkeypatch.delenv(var, raising=False)
    assert use_short_spins() and os.environ["GOMP_SPINCOUNT"] == str(SPIN_COUNT)
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    assert not use_short_spins() and os.environ["GOMP_SPINCOUNT"] == "10000"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert not use_short_spins() and "GOMP_SPINCOUNT" not in os.environ


def test_cpu_threads_flag_reaches_the_engine(tmp_path):
    assert parse_args(["--cpu-threads", "1"]).engine_kwargs()["cpu_threads"] == 1
    assert parse_args([]).engine_kwargs()["cpu_threads"] is None
    assert default_threads() == len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        LLM(build_checkpoint(str(tmp_path), "llama"), device="cpu", dtype="float32", cpu_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
