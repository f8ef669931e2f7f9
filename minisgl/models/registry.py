"""Which class serves which `architectures[0]` of a config.json."""

from __future__ import annotations

import importlib

from minisgl.models.base import CausalLM

# architecture name -> "module:Class", imported on demand so one broken model never blocks the others.
_REGISTRY: dict[str, str] = {
    "LlamaForCausalLM": "minisgl.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "minisgl.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "minisgl.models.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "minisgl.models.llama:LlamaForCausalLM",
    "Qwen3MoeForCausalLM": "minisgl.models.qwen3_moe:Qwen3MoeForCausalLM",
    "GPTNeoXForCausalLM": "minisgl.models.gpt_neox:GPTNeoXForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def model_class(architecture: str) -> type[CausalLM]:
    if architecture not in _REGISTRY:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(supported_architectures())}"
        )
    module, cls = _REGISTRY[architecture].split(":")
    return getattr(importlib.import_module(module), cls)
