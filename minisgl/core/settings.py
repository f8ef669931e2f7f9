"""Every environment variable minisgl reads, with its meaning: the one place to look them up.

Each is read when asked, not at import, so a test can set one for the code it runs; flags with the same meaning
(`--disable-overlap-schedule`) take precedence where both exist.

| variable | meaning |
|---|---|
| `MINISGL_NATIVE=0` | CPU: use torch ops instead of the native C++ kernels |
| `MINISGL_CACHE_DIR` | where native kernels built on first use are kept (default ~/.cache/minisgl) |
| `MINISGL_PDL=0` | CUDA: launch the decode kernels without programmatic dependent launch |
| `MINISGL_DISABLE_OVERLAP_SCHEDULING=1` | run each step's bookkeeping after its forward, not beside it |
| `TRITON_INTERPRET=1` | Triton's own: run Triton kernels on the CPU in its interpreter (tests) |
| `CXX` | the C++ compiler for the native kernels (default g++, else c++) |
"""

from __future__ import annotations

import os


def native_kernels() -> bool:
    return os.environ.get("MINISGL_NATIVE", "1") != "0"


def native_cache_dir() -> str:
    return os.environ.get("MINISGL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "minisgl")


def pdl_allowed() -> bool:
    return os.environ.get("MINISGL_PDL") != "0"


def overlap_disabled() -> bool:
    return os.environ.get("MINISGL_DISABLE_OVERLAP_SCHEDULING") == "1"


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def cxx() -> str | None:
    return os.environ.get("CXX")
