"""How CPU kernel threads share the machine: they spin only briefly before they sleep, and there are as many as
the cores this process may use (`--cpu-threads`, llama.cpp's -t), less the cores other processes keep busy
(`CpuShare`, unless --cpu-threads fixes the number).

OpenMP threads (torch's, which the native kernels run on too) wait at the end of each parallel region for the
next one. libgomp's default spins for ~300k iterations first: on a machine doing other things, a spinning thread
holds a core that the thread it waits for needs, and decode slows to a crawl. Sleeping at once
(OMP_WAIT_POLICY=PASSIVE) fixes that but pays a wake-up per region, and a decode step runs a few hundred
regions. A short spin (SPIN_COUNT) keeps back-to-back regions hot and still yields the core within
microseconds. libgomp reads the variable once, when it is loaded (with torch), so `use_short_spins` must run
before torch is imported: `import minisgl` calls it when torch is not loaded yet (the CLI and the offline API
alike), and the engine processes the server spawns inherit the environment. This module must not import torch.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time

logger = logging.getLogger(__name__)

_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# Spins before a waiting thread sleeps: the measured balance between an idle machine's decode speed and a busy
# one's (GOMP_SPINCOUNT in `git log -p -- docs/benchmarks.md`).
SPIN_COUNT = 500


def use_short_spins() -> bool:
    """Set GOMP_SPINCOUNT=SPIN_COUNT unless the user chose how threads wait (any of _WAIT_VARS set). Returns
    whether it set it. Has no effect on an OpenMP runtime already loaded in this process."""
    if any(v in os.environ for v in _WAIT_VARS):
        return False
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True


def default_threads() -> int:
    """The cores this process may run on: its affinity mask (taskset, a container's --cpuset-cpus), and no more
    than its CPU quota (a container's --cpus) rounded up, since threads beyond the quota only get throttled."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """The CPU time this process's cgroup (or an ancestor's) may use, in cores; None without a limit. Reads
    cgroup v2's cpu.max ("QUOTA PERIOD" or "max PERIOD") or v1's cpu.cfs_quota_us / cpu.cfs_period_us."""
    try:
        with open(proc_cgroup) as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    limits = []
    for _, controllers, path in (e for e in entries if len(e) == 3):
        if controllers == "":  # v2: one hierarchy
            files = [("", "cpu.max")]
        elif "cpu" in controllers.split(","):  # v1: mounted as cpu, cpu,cpuacct, ...
            files = [(d, "cpu.cfs_quota_us") for d in dict.fromkeys(("cpu", "cpu,cpuacct", controllers))]
        else:
            continue
        for mount, name in files:
            base = os.path.join(root, mount)
            parts = [p for p in path.split("/") if p]
            # from the process's own cgroup up to the mount's root (inside a container, only the root is there)
            for depth in range(len(parts), -1, -1):
                limit = _read_quota(os.path.join(base, *parts[:depth]), name)
                if limit is not None:
                    limits.append(limit)
    return min(limits) if limits else None


def _read_quota(folder: str, name: str) -> float | None:
    try:
        if name == "cpu.max":
            with open(os.path.join(folder, name)) as f:
                quota, period = f.read().split()[:2]
        else:
            with open(os.path.join(folder, name)) as f:
                quota = f.read().strip()
            with open(os.path.join(folder, "cpu.cfs_period_us")) as f:
                period = f.read().strip()
        if quota in ("max", "-1") or int(period) <= 0:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None


class CpuShare:
    """How many kernel threads to run: the cores of this process's affinity mask that other processes leave free.

    A decode step is a few hundred parallel regions, each ending when its slowest thread does; a thread that
    shares its core with a busy process gets half of it, so every region waits for it. Measured with one of two
    cores taken by a busy loop: one thread decodes about 1.8x faster than two. `poll` (call it before each
    forward; it reads the clock and, at most every `interval` seconds, /proc/stat) returns a new thread count when
    the busy cores of other processes, rounded, changed what is free. Linux only; elsewhere it never changes.
    """

    def __init__(self, max_threads: int, interval: float = 0.5):
        self.max_threads = max_threads
        self.threads = max_threads
        self.interval = interval
        self._cpus = {f"cpu{c}" for c in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else set()
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        """(time, seconds the affinity mask's cores were busy, CPU seconds of this process), or None."""
        try:
            with open("/proc/stat") as f:
                busy_ticks = 0
                for line in f:
                    name, *fields = line.split()
                    if name in self._cpus:  # user nice system idle iowait irq softirq steal ...
                        t = [int(x) for x in fields[:8]]
                        busy_ticks += t[0] + t[1] + t[2] + t[5] + t[6] + t[7]
        except (OSError, ValueError, IndexError):
            return None
        own = os.times()
        return time.monotonic(), busy_ticks / self._hz, own.user + own.system

    def poll(self) -> int | None:
        """A new thread count, or None when it stays."""
        if self._last is None or time.monotonic() - self._last[0] < self.interval:
            return None
        now = self._sample()
        if now is None:
            return None
        elapsed = now[0] - self._last[0]
        others = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / elapsed  # cores, on average
        self._last = now
        threads = max(1, min(self.max_threads, len(self._cpus) - round(others)))
        if threads == self.threads:
            return None
        self.threads = threads
        return threads


class ThreadProbe:
    """Which of two thread counts, `most` or `most - 1`, runs a recurring step faster, found by timing it.

    A one-request decode step of the server races its HTTP and detokenizer processes, which work at every token:
    on all cores they preempt a kernel thread that each parallel region then waits for, on one core fewer they
    run beside it. Which costs less depends on the CPU (a fast core decodes one row nearly as fast alone; a slow
    one needs every thread), so the engine times both where it runs. For each `most` it is called with, it probes
    `turns` turns of `turn` steps on each count, alternating, then runs the count of the shorter median period
    for `hold` steps, then probes again. A period runs from one step's start to the next's, so it holds
    everything the server does per token; `next` counts it only when nothing else ran between (`interrupt`
    marks other steps) and `most` stayed.
    """

    def __init__(self, turn: int = 8, turns: int = 4, hold: int = 1024):
        self.turn, self.turns, self.hold = turn, turns, hold
        self.best: dict[int, int] = {}  # most -> the faster count, while it holds
        self.periods: dict[int, dict[int, list[float]]] = {}  # most -> threads -> periods, while it probes
        self._steps: dict[int, int] = {}  # most -> steps since its probe or hold began
        self._last: tuple[float, int, int] | None = None  # (start, most, threads) of the step just before

    def interrupt(self) -> None:
        self._last = None

    def next(self, most: int, now: float | None = None) -> int:
        """The thread count for a step starting `now` (monotonic seconds), with `most` threads allowed."""
        if most == 1:
            self._last = None
            return 1
        now = time.monotonic() if now is None else now
        periods = self.periods.setdefault(most, {})
        if self._last is not None and self._last[1] == most and most not in self.best:
            periods.setdefault(self._last[2], []).append(now - self._last[0])
        steps = self._steps[most] = self._steps.get(most, 0) + 1
        if most in self.best and steps > self.hold:  # probe again: the load may have changed
            del self.best[most]
            periods.clear()
            steps = self._steps[most] = 1
        if most not in self.best and all(len(periods.get(n, ())) >= self.turn * self.turns for n in (most, most - 1)):
            median = {n: statistics.median(periods[n]) for n in (most, most - 1)}
            fast, slow = sorted((most - 1, most), key=median.get)  # a tie leaves the core
            self.best[most] = fast
            logger.debug("one-request decode: %d threads (%.2f ms a step) rather than %d (%.2f ms)", fast,
                         1e3 * median[fast], slow, 1e3 * median[slow])  # fmt: skip
            steps = self._steps[most] = 1
        threads = self.best.get(most, most - (steps - 1) // self.turn % 2)
        self._last = (now, most, threads)
        return threads
