"""What every model class shares: the forward contract and streaming weight loading."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from minisgl.engine.forward import ForwardBatch


class CausalLM(nn.Module):
    """A decoder-only LM. `forward(batch)` returns float32 logits for the rows in `batch.logits_index`.

    Weights load from a stream of (HF name, tensor) pairs: each name is routed to one of our modules (which
    exposes `load(name, tensor, shard)`), so no second copy of the model is ever built. `fused` lists HF name
    fragments that we store inside a fused module, with the shard index they occupy there.
    """

    fused: ClassVar[list[tuple[str, str, int]]] = []
    ignored: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        raise NotImplementedError

    def route_weight(self, name: str) -> tuple[str, int]:
        """Map an HF tensor name to (our module path, shard index)."""
        for hf_part, ours, shard in self.fused:
            if hf_part in name:
                return name.replace(hf_part, ours).rpartition(".")[0], shard
        return name.rpartition(".")[0], 0

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(self.ignored):
                continue
            path, shard = self.route_weight(name)
            module = modules.get(path)
            if module is None or not hasattr(module, "load"):
                if name.startswith("lm_head") and getattr(self, "tie_word_embeddings", False):
                    continue  # some tied checkpoints still ship a copy of the embedding
                raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            module.load(name, tensor, shard)
            loaded.add(path)
        self._check_complete(loaded)

    def _check_complete(self, loaded: set[str]) -> None:
        def covered(path: str) -> bool:  # loaded itself, or part of a module that was
            return any(path == p or path.startswith(p + ".") for p in loaded)

        missing = [
            path
            for path, module in self.named_modules()
            if hasattr(module, "load") and not covered(path) and getattr(module, "tied", None) is None
        ]
        if missing:
            raise ValueError(f"checkpoint is missing weights for: {', '.join(missing[:8])}")
