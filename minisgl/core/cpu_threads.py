"""How CPU kernel threads share the machine: they spin only briefly before they sleep, and there are as many as
the cores this process may use (`--cpu-threads`, llama.cpp's -t).

OpenMP threads (torch's, which the native kernels run on too) wait at the end of each parallel region for the
next one. libgomp's default spins for ~300k iterations first: on a machine doing other things, a spinning thread
holds a core that the thread it waits for needs, and decode slows to a crawl. Sleeping at once
(OMP_WAIT_POLICY=PASSIVE) fixes that but pays a wake-up per region, and a decode step runs a few hundred
regions. A short spin (SPIN_COUNT) keeps back-to-back regions hot and still yields the core within
microseconds. libgomp reads the variable once, when it is loaded (with torch), so `use_short_spins` must run
before torch is imported: the CLI entry point calls it first thing, and the engine processes it spawns inherit
the environment. This module must not import torch.
"""

from __future__ import annotations

import os

_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# Spins before a waiting thread sleeps: the measured balance between an idle machine's decode speed and a busy
# one's (docs/benchmarks.md, "Sharing the machine").
SPIN_COUNT = 500


def use_short_spins() -> bool:
    """Set GOMP_SPINCOUNT=SPIN_COUNT unless the user chose how threads wait (any of _WAIT_VARS set). Returns
    whether it set it. Has no effect on an OpenMP runtime already loaded in this process."""
    if any(v in os.environ for v in _WAIT_VARS):
        return False
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True


def default_threads() -> int:
    """The cores this process may run on (its affinity mask, as taskset or a container limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
