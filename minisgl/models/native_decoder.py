"""Llama-family decode on the CPU in one native call per decoder layer (kernels/csrc/decoder.h).

With the native kernels, the module path already runs each op of a layer in C++; at batch 1 what remains is the
interpreter between a dozen calls per layer, about as long as the int4 matmuls themselves. For a model that
qualifies (see `build`), a decode step hands each layer to `native.decoder_layer`, which runs the same kernels
in the same order with the same bf16 rounding. Prefill, and any model or batch that does not qualify, keep the
module path; tests hold the two to the same tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from minisgl.attention.base import AttentionBackend
from minisgl.attention.cpu_backend import CpuBackend, CpuDecodeMetadata
from minisgl.engine.forward import ForwardBatch
from minisgl.kernels import native
from minisgl.kvcache.pool import KVPool
from minisgl.layers.linear import Linear
from minisgl.layers.rotary import Rope

# Above this many sequences the matmuls dominate and torch's int4 kernel, which reuses each weight across
# more rows at once, is as fast; the module path then costs nothing extra.
MAX_BATCH = 8


def _int4(linear: Linear) -> native.Int4Weight | None:
    if linear.bias is not None or linear.tp.size != 1 or not hasattr(linear, "qscale_min"):
        return None
    qweight, sm = linear.qweight, linear.qscale_min
    if not (qweight.is_contiguous() and sm.is_contiguous() and sm.dtype == torch.float16):
        return None
    return native.Int4Weight(qweight.data_ptr(), sm.data_ptr(), linear.out_features, linear.in_features)


class NativeDecoder:
    """The decode-step runner of one model: a `native.DecoderWeights` per layer, built once."""

    def __init__(self, layers: list[native.DecoderWeights]):
        self.layers = layers

    def applies(self, batch: ForwardBatch) -> bool:
        return isinstance(batch.attn_metadata, CpuDecodeMetadata) and batch.batch_size <= MAX_BATCH

    def run(self, rope: Rope, h: torch.Tensor, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """All layers on h [B, hidden] (the embeddings, overwritten); returns (h, residual) as the module path's
        last layer does."""
        meta: CpuDecodeMetadata = batch.attn_metadata
        cos, sin, out_loc = rope.cos.contiguous(), rope.sin.contiguous(), batch.out_loc.long()
        step = native.DecodeStep(cos.data_ptr(), sin.data_ptr(), out_loc.data_ptr(), meta.slots.data_ptr(),
                                 meta.lens.data_ptr(), batch.batch_size, meta.slots.shape[1])  # fmt: skip
        residual = torch.empty_like(h)
        for i, weights in enumerate(self.layers):
            native.decoder_layer(weights, step, h, residual, first=i == 0)
        return h, residual


def build(model: nn.Module, pool: KVPool, backend: AttentionBackend) -> NativeDecoder | None:
    """A NativeDecoder for `model` (a LlamaForCausalLM), or None unless every layer qualifies: int4 weights in
    minisgl's CPU layout without biases, one rank, fp32 or bf16, no q/k norm, a gated MLP, and the cpu attention
    backend decoding natively (native kernels loaded, at either ISA level)."""
    from minisgl.models.llama import GatedMLP, LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM) or not native.available():
        return None
    if not (isinstance(backend, CpuBackend) and backend.native_decode):
        return None
    dtype = pool.dtype
    if dtype not in (torch.bfloat16, torch.float32) or model.model.rotary.cos.dtype != dtype:
        return None
    layers = []
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qk_norm or not isinstance(mlp, GatedMLP):
            return None
        linears = [_int4(attn.qkv_proj), _int4(attn.o_proj), _int4(mlp.gate_up_proj), _int4(mlp.down_proj)]
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        if any(w is None for w in linears) or any(n.dtype != dtype for n in norms):
            return None
        layers.append(
            native.DecoderWeights(
                norms[0].data_ptr(), norms[1].data_ptr(), *linears, pool.k(i).data_ptr(), pool.v(i).data_ptr(),
                model.config.hidden_size, attn.num_q, attn.num_kv, attn.head_dim, mlp.down_proj.in_features,
                model.model.rotary.cos.shape[1], int(dtype == torch.bfloat16), layer.input_layernorm.eps,
                backend.scale,
            )  # fmt: skip
        )
    return NativeDecoder(layers)
