"""Streaming weight sources: (HF name, tensor) pairs, one tensor in memory at a time."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch

from minisgl.quant.blocks import QuantizedBlocks


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


def iter_weights(
    model_path: str, dtype: torch.dtype, keep_quantized: bool = False
) -> Iterator[tuple[str, torch.Tensor | QuantizedBlocks]]:
    """Every weight of a checkpoint; `keep_quantized` lets a GGUF yield its 4/8-bit blocks undequantized."""
    if model_path.endswith(".gguf"):
        from minisgl.models.gguf import iter_gguf_weights

        yield from iter_gguf_weights(model_path, dtype, keep_quantized)
    else:
        yield from iter_safetensors(model_path)


def fill_dummy_weights(model: torch.nn.Module, seed: int, device: torch.device) -> None:
    """Random weights for benchmarks (`load_format="dummy"`): small normal values, norm scales near one, so
    activations stay finite through many layers.

    A quantized layer's rows are generated a slice at a time and quantized at once, and each layer is finalized
    before the next: the model never exists densely (a 1.5B model in int4 stays well below its bf16 size)."""
    from minisgl.layers.linear import Linear

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
        gen = gens.setdefault(device, torch.Generator(device=device).manual_seed(seed))
        for module in model.modules():
            if isinstance(module, Linear) and module.method is not None:
                for start in range(0, module.out_features, _DUMMY_ROWS):
                    n = min(_DUMMY_ROWS, module.out_features - start)
                    # float32, what quantization computes in anyway: no conversion copy per slice
                    rows = torch.empty(n, module.in_features, device=device, dtype=torch.float32)
                    module.write_rows(start, rows.normal_(0.0, 0.02, generator=gen))
                module.finalize()


_DUMMY_ROWS = 512  # rows of a quantized layer generated at once: bounds the float32 temporaries
