"""CPU kernel threads share the machine: short OpenMP spins unless the user chose otherwise, --cpu-threads."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time

import pytest
import torch
from checkpoints import build_checkpoint

from minisgl import LLM
from minisgl.core import cpu_threads
from minisgl.core.cpu_threads import (
    SPIN_COUNT,
    CpuShare,
    ThreadProbe,
    cgroup_cpu_quota,
    default_threads,
    use_short_spins,
)
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


@pytest.mark.parametrize("torch_first", [False, True])
def test_import_minisgl_shortens_spins_before_torch_loads(torch_first):
    """Only an import before torch's can still reach libgomp; after it, the environment is left alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    code = ("import torch; " if torch_first else "") + "import minisgl, os; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("None" if torch_first else str(SPIN_COUNT))


def write_files(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    "proc_cgroup,files,cores",
    [
        # cgroup v2 inside a container (docker run --cpus=1.5): the namespace's root holds the limit
        ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),
        # v2 on a host: the tightest limit between the process's cgroup and the root
        ("0::/a.slice/b.scope\n", {"a.slice/cpu.max": "300000 100000", "a.slice/b.scope/cpu.max": "max 100000"}, 3.0),
        # v1, cpu and cpuacct mounted together
        (
            "4:memory:/x\n2:cpu,cpuacct:/x\n",
            {"cpu,cpuacct/x/cpu.cfs_quota_us": "50000", "cpu,cpuacct/x/cpu.cfs_period_us": "100000"},
            0.5,
        ),
        ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        ("0::/\n", {}, None),  # no controller files at all
    ],
)
def test_cgroup_cpu_quota(tmp_path, proc_cgroup, files, cores):
    write_files(tmp_path / "fs", files)
    (tmp_path / "self_cgroup").write_text(proc_cgroup)
    assert cgroup_cpu_quota(str(tmp_path / "fs"), str(tmp_path / "self_cgroup")) == cores


def test_default_threads_stay_within_the_cpu_quota(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(cpu_threads, "cgroup_cpu_quota", lambda: 0.5)
    assert default_threads() == 1
    monkeypatch.setattr(cpu_threads, "cgroup_cpu_quota", lambda: cores + 0.5)
    assert default_threads() == cores


def run_steps(probe: ThreadProbe, most: int, seconds: dict[int, float], steps: int, clock: list[float]) -> list[int]:
    """`steps` back-to-back steps on a fake clock, each taking seconds[threads]; the thread counts used."""
    used = []
    for _ in range(steps):
        used.append(probe.next(most, clock[0]))
        clock[0] += seconds[used[-1]]
    return used


@pytest.mark.parametrize("faster", [1, 2])
def test_thread_probe_settles_on_the_faster_count(faster):
    probe, clock = ThreadProbe(turn=4, turns=3, hold=50), [0.0]
    seconds = {faster: 0.006, 3 - faster: 0.008}
    probing = run_steps(probe, 2, seconds, 25, clock)
    assert probing[:8] == [2, 2, 2, 2, 1, 1, 1, 1]  # turns of four, all cores first
    assert probing[-1] == faster and probe.best == {2: faster}
    assert run_steps(probe, 2, seconds, 49, clock) == [faster] * 49  # holds for 50 steps, then probes again
    assert run_steps(probe, 2, seconds, 1, clock) == [2] and not probe.best
    seconds = {faster: 0.009, 3 - faster: 0.008}  # the load changed: the next probe finds it
    run_steps(probe, 2, seconds, 30, clock)
    assert probe.best == {2: 3 - faster}


def test_thread_probe_counts_only_back_to_back_steps():
    """A step followed by something else (a prefill, an idle server) says nothing about its own length."""
    probe, now = ThreadProbe(turn=2, turns=3, hold=100), 0.0
    for step in range(100):
        threads = probe.next(2, now)
        now += 0.006
        if threads == 2 and step % 2:  # as if every other step on two threads were followed by a long prefill
            probe.interrupt()
            now += 1.0
    assert probe.best == {2: 2}


def test_thread_probe_keeps_what_it_learnt_for_each_share():
    probe, clock = ThreadProbe(turn=2, turns=2, hold=1000), [0.0]
    run_steps(probe, 3, {3: 0.01, 2: 0.005}, 12, clock)
    assert probe.best == {3: 2}
    assert run_steps(probe, 1, {1: 0.01}, 3, clock) == [1, 1, 1]  # one core free: nothing to choose
    assert run_steps(probe, 2, {2: 0.004, 1: 0.005}, 12, clock)[-1] == 2
    assert probe.best == {3: 2, 2: 2}
    assert run_steps(probe, 3, {3: 0.01, 2: 0.005}, 4, clock) == [2] * 4  # back to three: no second probe


@pytest.mark.parametrize("spare", [True, False])
def test_single_row_decode_tries_leaving_a_core_to_the_server(tmp_path, spare):
    """Under cpu_spare_core (the server's engine), a decode step of one request runs on all threads or one fewer,
    as the engine's ThreadProbe finds faster; prefill and decode of several requests keep them all. The offline
    engine keeps them all always."""
    from minisgl import SamplingParams

    before = torch.get_num_threads()
    try:
        llm = LLM(build_checkpoint(str(tmp_path), "llama"), device="cpu", dtype="float32", cpu_spare_core=spare)
        engine = llm.scheduler.engine
        engine.cpu_share = CpuShare(2, interval=1e9)  # two threads, whatever else this machine runs
        assert (engine.thread_probe is not None) == spare
        if spare:
            engine.thread_probe = ThreadProbe(turn=2, turns=2)
        seen = []
        prepare = engine.attn_backend.prepare

        def spy(batch):
            seen.append(("decode" if batch.is_decode else "prefill", batch.batch_size, torch.get_num_threads()))
            return prepare(batch)

        engine.attn_backend.prepare = spy
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        llm.generate([[1, 2, 3]], params)
        llm.generate([[4, 5, 6], [7, 8, 9, 10]], params)
        one_row = [threads for kind, rows, threads in seen if (kind, rows) == ("decode", 1)]
        assert one_row[:8] == ([2, 2, 1, 1, 2, 2, 1, 1] if spare else [2] * 8), seen
        if spare:
            assert engine.thread_probe.best and set(one_row[9:]) == set(engine.thread_probe.best.values()), seen
        assert all(threads == 2 for kind, rows, threads in seen if (kind, rows) != ("decode", 1)), seen
        assert {(k, r) for k, r, _ in seen} >= {("prefill", 1), ("decode", 1), ("decode", 2)}
    finally:
        torch.set_num_threads(before)


def test_cpu_threads_flag_reaches_the_engine(tmp_path):
    assert parse_args(["--cpu-threads", "1"]).engine_kwargs()["cpu_threads"] == 1
    assert parse_args([]).engine_kwargs()["cpu_threads"] is None
    assert 1 <= default_threads() <= len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        LLM(build_checkpoint(str(tmp_path), "llama"), device="cpu", dtype="float32", cpu_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _busy_loop() -> None:
    while True:
        pass


def _poll_after(share: CpuShare, seconds: float) -> int:
    time.sleep(seconds)
    share.poll()
    return share.threads


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_threads_follow_the_cores_other_processes_leave_free():
    """With one core of this process's mask kept busy by another process, one thread fewer; back to all of
    them once it stops."""
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("needs two cores")
    share = CpuShare(cores, interval=0.2)
    assert _poll_after(share, 0.3) == cores  # this test machine is otherwise idle
    busy = multiprocessing.get_context("spawn").Process(target=_busy_loop, daemon=True)
    busy.start()
    try:
        time.sleep(0.5)  # the interpreter starting up is not the busy loop yet
        share.poll()
        assert _poll_after(share, 0.6) == cores - 1
    finally:
        busy.kill()
        busy.join()
    assert _poll_after(share, 0.6) == cores


def test_a_chosen_thread_count_stays_fixed(tmp_path):
    path = build_checkpoint(str(tmp_path), "llama")
    before = torch.get_num_threads()
    try:
        assert LLM(path, device="cpu", dtype="float32", cpu_threads=1).scheduler.engine.cpu_share is None
        assert LLM(path, device="cpu", dtype="float32").scheduler.engine.cpu_share is not None
    finally:
        torch.set_num_threads(before)
