"""Programmatic dependent launch (PDL, Hopper and later): a kernel launched with `launch_pdl=True` may start
while the kernel before it in the stream still runs, so its setup and its reads of data no kernel writes
(weights) overlap that kernel's tail and the launch gap.

The contract, for every kernel launched with `launch_pdl=True`:
- call `wait_prior(PDL)` in every program before reading anything an earlier kernel wrote and before writing
  anything an earlier kernel may still read (after it, all earlier kernels have finished and their writes
  are visible);
- never skip it: a PDL kernel's completion must imply its predecessor's, or a later kernel could overtake it.
A kernel that usually comes just before a PDL kernel calls `release_dependents(PDL)` once its own work is
under way, which lets that kernel's programs launch before it finishes. `begin(PDL)` does both, in that order,
at the top of a kernel: the decode-path kernels (norms, rotary, KV store, decode attention, SiLU-and-mul, the
W8A16 and W4A16 GEMVs) all start with it and are launched with `**launch_args(device)`, so each step's chain of small
kernels launches back to back instead of paying a launch gap each. All of it is off (no-ops) under Triton's
interpreter, on GPUs older than Hopper, and with MINISGL_PDL=0.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from minisgl.core import settings

_OFF = settings.triton_interpret() or not settings.pdl_allowed()


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` use PDL: a CUDA device of compute capability 9.0 or later, not interpreted,
    and MINISGL_PDL is not 0 (both read at import)."""
    if device.type != "cuda" or _OFF:
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def launch_args(device: torch.device) -> dict[str, bool]:
    """The PDL constexpr and launch option for a kernel that starts with `begin` (or `wait_prior`)."""
    on = enabled(device)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def begin(PDL: tl.constexpr):
    wait_prior(PDL)
    release_dependents(PDL)


@triton.jit
def wait_prior(PDL: tl.constexpr):
    if PDL:
        gdc_wait()


@triton.jit
def release_dependents(PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
