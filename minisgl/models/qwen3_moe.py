"""Qwen3-MoE: Qwen3 attention with a mixture-of-experts MLP in the sparse layers."""

from __future__ import annotations

from torch import nn

from minisgl.distributed.info import TPInfo
from minisgl.layers.moe import MoE
from minisgl.models.config import ModelConfig
from minisgl.models.llama import GatedMLP, LlamaForCausalLM
from minisgl.quant import QuantConfig


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    """Experts are stacked tensors (layers/moe.py), not Linear layers, so under quantization they stay dense;
    attention, dense MLP layers and (when asked) the LM head are quantized."""

    def make_mlp(self, cfg: ModelConfig, layer_id: int, tp: TPInfo, quant: QuantConfig | None = None) -> nn.Module:
        hf = cfg.hf
        step = hf.get("decoder_sparse_step", 1) or 1
        sparse = layer_id not in hf.get("mlp_only_layers", []) and (layer_id + 1) % step == 0
        if not sparse:
            return GatedMLP(cfg.hidden_size, cfg.intermediate_size, tp, quant=quant)
        return MoE(
            cfg.hidden_size,
            hf["moe_intermediate_size"],
            hf.get("num_experts") or hf["num_local_experts"],  # transformers 5 renamed it
            hf["num_experts_per_tok"],
            hf.get("norm_topk_prob", True),
            tp,
        )

    def route_weight(self, name: str) -> tuple[str, int]:
        if ".mlp.experts." in name:
            return name.split(".experts.")[0], 0  # the MoE module itself
        return super().route_weight(name)
