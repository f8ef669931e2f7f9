"""Compile the native CPU kernels (csrc/) into one shared library per x86 ISA level, at package build time.

setup.py calls `build_all` when the package is built (`pip install .`, `pip install -e .`, `python -m build`), so
nothing compiles at run time and a wheel runs on a machine with no compiler. From a source checkout without an
install, `python -m minisgl.kernels.build` builds them in place. kernels/native.py loads the best level the CPU
reports.

The libraries are plain C ABI (no torch headers): one build serves every torch version. -fopenmp links
libgomp.so.1, which at run time resolves to the copy torch has already loaded, so parallel loops run on torch's
own OpenMP threads.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

SOURCES = Path(__file__).with_name("csrc")  # api.cpp includes the headers beside it
# Reassociation lets the compiler vectorise the fp32 reductions; no -ffast-math, so NaN and inf keep meaning.
COMMON_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros",
                "-shared", "-fPIC"]  # fmt: skip
# Each level is a psABI microarchitecture level, so the library runs on every CPU that reports it.
LEVEL_FLAGS = {
    "avx2": ["-march=x86-64-v3", "-mtune=generic"],  # AVX2 + FMA + F16C (Zen 2/3, Intel Core 4th gen on)
    "avx512": ["-march=x86-64-v4", "-mavx512bf16", "-mavx512vnni", "-mtune=generic"],  # + BF16/VNNI (Zen 4/5, SPR)
}


def library_name(level: str) -> str:
    return f"_cpu_{level}.so"


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def machine_is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def build_level(level: str, out_dir: Path, cxx: str) -> Path:
    target = out_dir / library_name(level)
    tmp = target.with_suffix(".so.tmp")
    cmd = [cxx, *COMMON_FLAGS, *LEVEL_FLAGS[level], "-o", str(tmp), str(SOURCES / "api.cpp")]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    os.replace(tmp, target)  # atomic: a process loading the library never sees half of one
    return target


def build_all(out_dir: Path, log=print) -> list[Path]:
    """Build every level this compiler and machine type can, into out_dir; returns the libraries built. Not x86,
    or no compiler: none (the package then runs the torch path), with a message saying so."""
    if not machine_is_x86():
        log(f"minisgl: no native CPU kernels for {platform.machine()}; the torch path will run")
        return []
    cxx = compiler()
    if cxx is None:
        log("minisgl: no C++ compiler found; the native CPU kernels are not built (the torch path will run)")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    built = []
    for level in LEVEL_FLAGS:
        try:
            built.append(build_level(level, out_dir, cxx))
        except subprocess.CalledProcessError as e:
            log(f"minisgl: building the {level} CPU kernels failed; that level is left out:\n{e.stderr[-2000:]}")
    return built


if __name__ == "__main__":
    libs = build_all(Path(__file__).parent, log=lambda m: print(m, file=sys.stderr))
    print("\n".join(str(p) for p in libs))
