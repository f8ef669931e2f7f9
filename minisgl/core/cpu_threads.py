"""How CPU kernel threads share the machine: they wait without spinning, and there are as many as the cores this
process may use (`--cpu-threads`, llama.cpp's -t).

OpenMP threads (torch's, which the native kernels run on too) spin at barriers by default, keeping their cores
busy between parallel regions; on a machine doing other things, a spinning thread holds a core that the thread it
waits for needs, and decode slows to a crawl. OMP_WAIT_POLICY=PASSIVE makes them sleep instead. libgomp reads
it once, when it is loaded (with torch), so `use_passive_waits` must run before torch is imported: the CLI entry
point calls it first thing, and the engine processes it spawns inherit the environment. This module must not
import torch.
"""

from __future__ import annotations

import os

_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def use_passive_waits() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user chose a wait policy (any of _WAIT_VARS set). Returns whether
    it set it. Has no effect on an OpenMP runtime already loaded in this process."""
    if any(v in os.environ for v in _WAIT_VARS):
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def default_threads() -> int:
    """The cores this process may run on (its affinity mask, as taskset or a container limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
