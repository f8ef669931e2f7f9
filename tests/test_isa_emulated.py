"""The AVX2 level on a CPU that has no AVX-512, emulated: qemu-x86_64 with AMD's EPYC-Milan (Zen 3) model, whose
cpuid reports AVX2, FMA and F16C but no AVX-512 and no AVX512-BF16.

qemu cannot execute AVX-512 at all, so an AVX-512 instruction in the avx2 library (a stray -march, an intrinsic
outside its guard) kills the process; torch, MKL and oneDNN choose their own kernels from that cpuid too, as on
such a CPU (torch's packed int4 layout, for one, differs there). /proc/cpuinfo is still the host's, so the level
is forced with MINISGL_CPU_ISA=avx2 and the AVX-512 cases are deselected. This shows correctness there, not speed.
Skipped where qemu-user is not installed (.ci/run installs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

QEMU = shutil.which("qemu-x86_64")
CPU_MODEL = "EPYC-Milan-v1"
ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.skipif(QEMU is None, reason="qemu-user (qemu-x86_64) is not installed")]


def emulated(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "MINISGL_CPU_ISA": "avx2", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [QEMU, "-cpu", CPU_MODEL, sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_emulated_cpu_has_avx2_only():
    """What the rest stands on: torch sees AVX2 and no AVX-512, and minisgl loads its avx2 library there."""
    code = (
        "import torch; from minisgl.kernels import native; "
        "print(torch.backends.cpu.get_cpu_capability(), native.level(), native.has_native_bf16())"
    )
    r = emulated("-c", code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["AVX2", "avx2", "False"]


def test_kernels_and_int4_layers_pass_on_the_emulated_cpu():
    """The kernel tests at the AVX2 level and the int4 tests that failed on a real AVX2 CPU before minisgl owned
    its int4 layout, run whole under emulation."""
    r = emulated(
        "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not avx512",
        "tests/test_native_kernels.py",
        "tests/test_quant_methods.py::test_cpu_kernel_matches_dequantized_matmul",
        "tests/test_quant_methods.py::test_cpu_kernels_in_float32",
        "tests/test_quant_methods.py::test_gguf_blocks_into_layers",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout
