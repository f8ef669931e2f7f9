"""GPT-NeoX (Pythia and friends): parallel residual, partial rotary, LayerNorm with bias, per-head fused QKV."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minisgl.core.forward_batch import ForwardBatch
from minisgl.distributed.info import TPInfo
from minisgl.layers.attention import PagedAttention
from minisgl.layers.linear import Linear, LMHead, VocabEmbedding
from minisgl.layers.norm import LayerNorm
from minisgl.layers.rotary import Rope, RotaryEmbedding, apply_rotary
from minisgl.models.base import CausalLM
from minisgl.models.config import ModelConfig
from minisgl.quant import QuantConfig

_GELU_APPROX = {"gelu": "none", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu_pytorch_tanh": "tanh"}


class NeoXAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPInfo, quant: QuantConfig | None = None):
        super().__init__()
        bias = cfg.hf.get("attention_bias", True)
        self.num_heads = tp.shard(cfg.num_q_heads, "num_attention_heads")
        self.head_dim = cfg.head_dim
        # HF stores q/k/v interleaved per head ([heads, 3, head_dim] rows), so a contiguous slice of
        # rows is a whole set of heads: column parallelism needs no reordering.
        self.query_key_value = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias, "column", tp, quant=quant)
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size, bias, "row", tp, quant=quant)
        self.attn = PagedAttention(layer_id, self.num_heads, self.num_heads, self.head_dim)

    def forward(self, rope: Rope, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        qkv = self.query_key_value(x).view(x.shape[0], self.num_heads, 3, self.head_dim)
        apply_rotary(qkv[:, :, :2], rope)  # q and k of every head, in place
        q, k, v = qkv.unbind(dim=2)
        return self.dense(self.attn(q, k, v, batch))


class NeoXMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPInfo, quant: QuantConfig | None = None):
        super().__init__()
        self.dense_h_to_4h = Linear(cfg.hidden_size, cfg.intermediate_size, True, "column", tp, quant=quant)
        self.dense_4h_to_h = Linear(cfg.intermediate_size, cfg.hidden_size, True, "row", tp, quant=quant)
        act = cfg.hf.get("hidden_act", "gelu")
        if act not in _GELU_APPROX:
            raise NotImplementedError(f"GPT-NeoX hidden_act {act!r} is not supported")
        self.approximate = _GELU_APPROX[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class NeoXLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPInfo, quant: QuantConfig | None = None):
        super().__init__()
        self.parallel_residual = cfg.hf.get("use_parallel_residual", True)
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = NeoXAttention(cfg, layer_id, tp, quant)
        self.mlp = NeoXMLP(cfg, tp, quant)

    def forward(self, rope: Rope, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        attn = self.attention(rope, self.input_layernorm(x), batch)
        if self.parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x))
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class GPTNeoXModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPInfo, device: torch.device, quant: QuantConfig | None = None):
        super().__init__()
        self.embed_in = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.max_position_embeddings, device)
        self.layers = nn.ModuleList(NeoXLayer(cfg, i, tp, quant) for i in range(cfg.num_layers))
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.norm_eps)


class GPTNeoXForCausalLM(CausalLM):
    """HF's GPTNeoXForCausalLM layout: `gpt_neox.*` body and an untied `embed_out` head."""

    def __init__(self, cfg: ModelConfig, tp: TPInfo, device: torch.device, quant: QuantConfig | None = None):
        super().__init__()
        self.config = cfg
        self.tie_word_embeddings = cfg.tie_word_embeddings
        self.gpt_neox = GPTNeoXModel(cfg, tp, device, quant)
        tied = self.gpt_neox.embed_in if cfg.tie_word_embeddings else None
        self.embed_out = LMHead(cfg.vocab_size, cfg.hidden_size, tp, tied, quant)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        rope = self.gpt_neox.rotary.lookup(batch.positions)
        h = self.gpt_neox.embed_in(batch.input_ids)
        for layer in self.gpt_neox.layers:
            h = layer(rope, h, batch)
        h = self.gpt_neox.final_layer_norm(h[batch.logits_index])
        return self.embed_out(h).float()
