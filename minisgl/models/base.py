"""What every model class shares: the forward contract, per-layer quantization and streaming weight loading."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from minisgl.core.forward_batch import ForwardBatch
from minisgl.kernels.tuning import CPU_DENSE_HEAD_MIN_ROWS
from minisgl.layers.linear import Linear, LMHead
from minisgl.quant import QuantConfig, make_method
from minisgl.quant.blocks import QuantizedBlocks, as_dense
from minisgl.quant.config import KEEP_GGUF


class CausalLM(nn.Module):
    """A decoder-only LM. `forward(batch)` returns float32 logits for the rows in `batch.logits_index`.

    Weights load from a stream of (HF name, tensor) pairs: each name is routed to one of our modules (which
    exposes `load(name, tensor, shard)`), so no second copy of the model is ever built. `fused` lists HF name
    fragments that we store inside a fused module, with the shard index they occupy there.

    A model built with a QuantConfig must have `bind_quant` called before loading; the stream may then carry
    pre-quantized blocks (GGUF), which quantized layers take as they are and every other module dequantized.
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

    def bind_quant(self, quant: QuantConfig, device: torch.device, dtype: torch.dtype) -> None:
        """Give every layer built with `quant` its method and storage (call under the device/dtype the model was
        built with). Under KEEP_GGUF the file's tensor names say which weights each (fused) layer holds."""
        modules = dict(self.named_modules())
        path_of = {id(m): p for p, m in modules.items()}
        holds: dict[str, list[str]] = {}
        for name in quant.tensor_schemes:
            holds.setdefault(self.route_weight(name)[0], []).append(name)
        head_projs = {id(m.proj) for m in modules.values() if isinstance(m, LMHead) and m.proj is not None}
        methods = {}
        for path, module in modules.items():
            if isinstance(module, LMHead) and module.proj is not None:
                source = path_of[id(module.tied)] if module.tied is not None else path
                scheme = quant.scheme_for(holds.get(source, []), lm_head=True)
                layer = module.proj
                if module.tied is not None and quant.scheme == KEEP_GGUF and not quant.quantize_lm_head:
                    # on CUDA, and in fp32 on the CPU, the int8 kernels beat a dense matmul at every batch size
                    cpu_bf16 = device.type == "cpu" and dtype == torch.bfloat16
                    module.dense_from_rows = CPU_DENSE_HEAD_MIN_ROWS if cpu_bf16 else None
            elif isinstance(module, Linear) and module.quant is not None and id(module) not in head_projs:
                scheme, layer = quant.scheme_for(holds.get(path, [])), module
            else:
                continue
            if scheme is not None and scheme not in methods:
                methods[scheme] = make_method(scheme, device, dtype, quant.int8_activations)
            method = methods.get(scheme)
            if method is not None and not method.supports(layer.out_features, layer.in_features):
                method = None  # e.g. an input size that is not a whole number of groups: stays dense
            module.create_weights(method)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedBlocks]]) -> None:
        modules = dict(self.named_modules())
        path_of = {id(m): p for p, m in modules.items()}
        # A quantized head tied to the embedding keeps its own copy: it loads from the embedding's tensor.
        tied_heads = {
            path_of[id(m.tied)]: (p, m)
            for p, m in modules.items()
            if isinstance(m, LMHead) and m.tied is not None and m.proj is not None
        }
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
            if path in tied_heads:
                head_path, head = tied_heads[path]
                head.load(name, tensor if head.method is not None else as_dense(tensor))
                loaded.add(head_path)
            module.load(name, tensor if getattr(module, "method", None) is not None else as_dense(tensor), shard)
            loaded.add(path)
        self._check_complete(loaded)
        self.finalize_weights()

    def finalize_weights(self) -> None:
        """Let every quantized layer re-lay its weight out for its kernels, and a tied head share its rows with the
        embedding (LMHead.finalize), once all of it is loaded."""
        for module in self.modules():
            if isinstance(module, (Linear, LMHead)):
                module.finalize()

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
