import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, os.cpu_count() or 1))

# Without CUDA the Triton kernels run under Triton's interpreter on the CPU. The variable is read when
# @triton.jit decorates a kernel, so it must be set before anything imports triton (torch does not).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


if os.environ.get("TRITON_INTERPRET") == "1":
    from triton_interpreter import patch_triton_interpreter

    patch_triton_interpreter()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _lower_isa_levels() -> list[str]:
    """The native CPU kernel levels below the best this CPU runs (the best one runs in every other test)."""
    from minisgl.kernels import native

    best = native.cpu_level()
    return [] if best == "none" else list(native.LEVELS[: native.LEVELS.index(best)])


@pytest.fixture(params=_lower_isa_levels() or [pytest.param(None, marks=pytest.mark.skip("no lower ISA level"))])
def lower_isa(request, monkeypatch):
    """Run a test with the native kernels forced to a lower ISA level (MINISGL_CPU_ISA), as on a CPU that has
    only that level."""
    from minisgl.kernels import native

    monkeypatch.setenv("MINISGL_CPU_ISA", request.param)
    native._lib.cache_clear()
    assert native.level() == request.param
    yield request.param
    monkeypatch.undo()
    native._lib.cache_clear()
