"""minisgl: a small, readable, fast LLM inference and serving engine."""

from minisgl.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Import the engine lazily so `import minisgl` (e.g. for the CLI's --help) stays fast.
    if name == "LLM":
        from minisgl.llm import LLM

        return LLM
    raise AttributeError(name)
