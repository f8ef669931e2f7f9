"""Build step of the package: compile the native CPU kernels (minisgl/kernels/csrc) into one shared library per
x86 ISA level inside the package (minisgl/kernels/build.py), so nothing compiles at run time. Everything else is
in pyproject.toml.

The libraries are plain C (ctypes, no torch headers), built as setuptools extensions only so that `pip install .`,
`pip install -e .` and `python -m build` all run the step and place them (in-place for editable installs). No
compiler, or not x86: the package installs without them and runs its torch path.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent


def _kernel_build():
    # Loaded by path: importing minisgl here would import torch, which the build environment need not have.
    spec = importlib.util.spec_from_file_location("_minisgl_kernel_build", ROOT / "minisgl" / "kernels" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildCpuKernels(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        # A plain shared library loaded with ctypes: no Python ABI tag in its name.
        return str(Path(*fullname.split("."))) + ".so"

    def build_extension(self, ext: Extension) -> None:
        kb = _kernel_build()
        target = Path(self.get_ext_fullpath(ext.name))
        level = ext.name.rpartition("._cpu_")[2]
        cxx = kb.compiler()
        if cxx is None or not kb.machine_is_x86():
            print(f"minisgl: skipping the {level} CPU kernels (no C++ compiler, or not x86); the torch path runs")
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            built = kb.build_level(level, target.parent, cxx)
        except Exception as e:  # a compiler too old for the level's flags: leave that level out
            print(f"minisgl: building the {level} CPU kernels failed, leaving that level out: {e}")
            return
        if built != target:
            built.replace(target)


setup(
    ext_modules=[Extension(f"minisgl.kernels._cpu_{level}", sources=[]) for level in ("avx2", "avx512")],
    cmdclass={"build_ext": BuildCpuKernels},
)
