"""The Llama family: Llama (incl. Llama-3 rope scaling), Mistral, Qwen2/2.5 (qkv bias), Qwen3 (q/k norm).

One definition; the differences are config flags. Module names mirror HF's so weights route by name,
except q/k/v and gate/up, which are fused into one matmul each.
"""

from __future__ import annotations

import torch
from torch import nn

from minisgl.core.forward_batch import ForwardBatch
from minisgl.distributed.info import TPInfo
from minisgl.layers.activation import silu_and_mul
from minisgl.layers.attention import PagedAttention
from minisgl.layers.linear import Linear, LMHead, VocabEmbedding
from minisgl.layers.norm import RMSNorm
from minisgl.layers.rotary import Rope, RotaryEmbedding, apply_rotary
from minisgl.models.base import CausalLM
from minisgl.models.config import ModelConfig
from minisgl.quant import QuantConfig


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPInfo, quant: QuantConfig | None = None):
        super().__init__()
        hf = cfg.hf
        self.num_q = tp.shard(cfg.num_q_heads, "num_attention_heads")
        self.num_kv = max(1, cfg.num_kv_heads // tp.size)
        d = cfg.head_dim
        qkv_bias = hf.get("attention_bias", hf.get("model_type") == "qwen2")
        o_bias = hf.get("attention_bias", False) and hf.get("model_type") != "qwen2"
        kv_slices = min(tp.size, cfg.num_kv_heads)  # fewer kv heads than ranks: ranks share (replicate) one
        if tp.size % kv_slices:
            raise ValueError(f"{cfg.num_kv_heads} kv heads cannot be spread over {tp.size} ranks")
        self.qkv_proj = Linear(
            cfg.hidden_size,
            [cfg.num_q_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d],
            qkv_bias,
            "column",
            tp,
            slices=[tp.size, kv_slices, kv_slices],
            quant=quant,
        )
        self.o_proj = Linear(cfg.num_q_heads * d, cfg.hidden_size, o_bias, "row", tp, quant=quant)
        self.qk_norm = hf.get("model_type", "").startswith("qwen3")
        if self.qk_norm:
            self.q_norm = RMSNorm(d, cfg.norm_eps)
            self.k_norm = RMSNorm(d, cfg.norm_eps)
        self.attn = PagedAttention(layer_id, self.num_q, self.num_kv, d)
        self.head_dim = d

    def forward(self, rope: Rope, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        t, d, nq, nkv = x.shape[0], self.head_dim, self.num_q, self.num_kv
        qkv = self.qkv_proj(x)
        v = qkv[:, (nq + nkv) * d :]
        if self.qk_norm:
            q = self.q_norm(qkv[:, : nq * d].view(t, nq, d))
            k = self.k_norm(qkv[:, nq * d : (nq + nkv) * d].view(t, nkv, d))
            apply_rotary(q, rope)
            apply_rotary(k, rope)
        else:  # q and k sit side by side in qkv: rotate both in place with one set of ops
            qk = qkv[:, : (nq + nkv) * d].view(t, nq + nkv, d)
            apply_rotary(qk, rope)
            q, k = qk[:, :nq], qk[:, nq:]
        return self.o_proj(self.attn(q, k, v, batch))


class GatedMLP(nn.Module):
    def __init__(
        self, hidden: int, intermediate: int, tp: TPInfo, bias: bool = False, quant: QuantConfig | None = None
    ):
        super().__init__()
        self.gate_up_proj = Linear(hidden, [intermediate, intermediate], bias, "column", tp, quant=quant)
        self.down_proj = Linear(intermediate, hidden, bias, "row", tp, quant=quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPInfo, mlp: nn.Module, quant: QuantConfig | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_id, tp, quant)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = mlp

    def forward(
        self, rope: Rope, h: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm.forward_with_residual(h, residual)
        h = self.self_attn(rope, h, batch)
        h, residual = self.post_attention_layernorm.forward_with_residual(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPInfo, device: torch.device, make_mlp, quant: QuantConfig | None = None):
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp, make_mlp(i), quant) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.max_position_embeddings, device)


class LlamaForCausalLM(CausalLM):
    """Llama, Mistral, Qwen2 and Qwen3 (their HF class names all map here)."""

    fused = [
        (".q_proj.", ".qkv_proj.", 0),
        (".k_proj.", ".qkv_proj.", 1),
        (".v_proj.", ".qkv_proj.", 2),
        (".gate_proj.", ".gate_up_proj.", 0),
        (".up_proj.", ".gate_up_proj.", 1),
    ]

    def __init__(self, cfg: ModelConfig, tp: TPInfo, device: torch.device, quant: QuantConfig | None = None):
        super().__init__()
        self.config = cfg
        self.tie_word_embeddings = cfg.tie_word_embeddings
        self.model = LlamaModel(cfg, tp, device, lambda i: self.make_mlp(cfg, i, tp, quant), quant)
        tied = self.model.embed_tokens if cfg.tie_word_embeddings else None
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, tp, tied, quant)

    def make_mlp(self, cfg: ModelConfig, layer_id: int, tp: TPInfo, quant: QuantConfig | None = None) -> nn.Module:
        return GatedMLP(cfg.hidden_size, cfg.intermediate_size, tp, cfg.hf.get("mlp_bias", False), quant)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        rope = self.model.rotary.lookup(batch.positions)
        h = self.model.embed_tokens(batch.input_ids)
        residual: torch.Tensor | None = None
        for layer in self.model.layers:
            h, residual = layer(rope, h, residual, batch)
        idx = batch.logits_index
        h = self.model.norm(h[idx] + residual[idx])
        return self.lm_head(h).float()
