"""The built wheel runs its native CPU kernels on a machine with no C++ compiler: they are compiled at build
time, one library per ISA level, and nothing compiles at run time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minisgl.kernels import build, native

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(build.compiler() is None, reason="building the wheel needs a C++ compiler"),
    pytest.mark.skipif(native.cpu_level() == "none", reason="no native kernel level for this CPU"),
]

# Run in the fresh venv, from a directory outside the repository, with an empty PATH.
PROBE = """
import shutil, sys
import minisgl, torch
from minisgl import LLM, SamplingParams
from minisgl.kernels import native
assert shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("cc") is None, "a compiler"
assert minisgl.__file__.startswith(sys.prefix), minisgl.__file__
assert native.available(), "the wheel's native kernels did not load"
llm = LLM(sys.argv[1], device="cpu", dtype="float32", quantization="int4")
assert llm.scheduler.engine.cpu_runner is not None, "decode does not run natively"
out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
assert len(out.token_ids) == 6
print("LEVEL", native.level(), "TOKENS", out.token_ids)
"""


def test_wheel_runs_native_kernels_without_a_compiler(tmp_path):
    from checkpoints import build_checkpoint

    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, cwd=tmp_path)  # fmt: skip
    (wheel,) = wheels.glob("minisgl-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    # --force-reinstall: the venv sees the system site-packages (for torch), where minisgl may already be
    # installed (editable); the wheel's copy must land in the venv, ahead of it on sys.path (asserted in PROBE).
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q", str(wheel)], check=True
    )
    bare = tmp_path / "empty"  # the whole PATH: an empty folder, so no compiler can be found
    bare.mkdir()
    ckpt = build_checkpoint(str(tmp_path / "llama"), "llama3")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CXX", "CC", "MINISGL_CPU_ISA")}
    env["PATH"] = str(bare)
    env["HF_HUB_OFFLINE"] = "1"
    probe = subprocess.run([str(python), "-c", PROBE, ckpt], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert f"LEVEL {native.cpu_level()}" in probe.stdout
    shutil.rmtree(wheels)
