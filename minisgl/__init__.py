"""minisgl: a small, readable, fast LLM inference and serving engine."""

import sys

from minisgl.core.cpu_threads import use_short_spins
from minisgl.sampling_params import SamplingParams

if "torch" not in sys.modules:  # the offline API's threads wait as the server's do (core/cpu_threads.py)
    use_short_spins()

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Import the engine lazily so `import minisgl` (e.g. for the CLI's --help) stays fast.
    if name == "LLM":
        from minisgl.llm import LLM

        return LLM
    raise AttributeError(name)
