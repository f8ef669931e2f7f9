"""Streaming weight sources: (HF name, tensor) pairs, one tensor in memory at a time."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor of a single-file or sharded (index.json) safetensors checkpoint, lazily."""
    from safetensors import safe_open

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(model_dir, name) for name in files]
    else:
        files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def iter_weights(model_path: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    if model_path.endswith(".gguf"):
        from minisgl.models.gguf import iter_gguf_weights

        yield from iter_gguf_weights(model_path, dtype)
    else:
        yield from iter_safetensors(model_path)


def fill_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights for benchmarks (`load_format="dummy"`): small normal values, norm scales near one, so
    activations stay finite through many layers."""
    gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
                p.normal_(0.0, 0.02, generator=gen)
