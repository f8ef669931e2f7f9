"""Every environment variable minisgl reads, with its meaning: the one place to look them up.

Each is read when asked, not at import, so a test can set one for the code it runs; flags with the same meaning
(`--disable-overlap-schedule`) take precedence where both exist.

| variable | meaning |
|---|---|
| `MINISGL_NATIVE=0` | CPU: use torch ops instead of the native C++ kernels |
| `MINISGL_CPU_ISA` (avx2, avx512 or none) | CPU: load the native kernels of this level, not the best the CPU reports |
| `OMP_WAIT_POLICY`, `GOMP_SPINCOUNT`, `KMP_BLOCKTIME` | OpenMP's; unset, minisgl spins briefly (cpu_threads.py) |
| `MINISGL_PDL=0` | CUDA: launch the decode kernels without programmatic dependent launch |
| `MINISGL_DISABLE_OVERLAP_SCHEDULING=1` | run each step's bookkeeping after its forward, not beside it |
| `TRITON_INTERPRET=1` | Triton's own: run Triton kernels on the CPU in its interpreter (tests) |
| `MINISGL_CACHE_DIR` | converted GGUF tokenizers (default `$XDG_CACHE_HOME/minisgl`, else `~/.cache/minisgl`) |
| `CXX` | at build time (setup.py, kernels/build.py): the C++ compiler for the native kernels (default g++, else c++) |
"""

from __future__ import annotations

import os


def native_kernels() -> bool:
    return os.environ.get("MINISGL_NATIVE", "1") != "0"


def cpu_isa() -> str:
    """The forced ISA level, lower-cased; "" when not set."""
    return os.environ.get("MINISGL_CPU_ISA", "").strip().lower()


def pdl_allowed() -> bool:
    return os.environ.get("MINISGL_PDL") != "0"


def overlap_disabled() -> bool:
    return os.environ.get("MINISGL_DISABLE_OVERLAP_SCHEDULING") == "1"


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def cache_dir() -> str:
    explicit = os.environ.get("MINISGL_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "minisgl")
