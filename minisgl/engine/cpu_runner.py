"""The CPU decode runner: Llama-family decode in one native call per decoder layer (kernels/csrc/decoder.h), the
CPU counterpart of engine/graph.py's CUDA-graph runner.

With the native kernels, the module path already runs each op of a layer in C++; at small batches what remains
is the interpreter between a dozen calls per layer, about as long as the int4 matmuls themselves. For a model
that qualifies (see `build`), the engine hands a decode step to `CpuDecodeRunner.run`, which embeds, runs each
layer through `native.decoder_layer` (the same kernels in the same order with the same rounding), and applies
the model's final norm and head. Prefill, and any model or batch that does not qualify, keep the module path;
tests hold the two to the same tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from minisgl.attention.base import AttentionBackend
from minisgl.attention.cpu_backend import CpuBackend, CpuDecodeMetadata
from minisgl.core.forward_batch import ForwardBatch
from minisgl.kernels import native
from minisgl.kernels.tuning import CPU_INT4_NATIVE_MAX_ROWS
from minisgl.kvcache.pool import KVPool
from minisgl.layers.linear import Linear
from minisgl.models.llama import GatedMLP, LlamaForCausalLM
from minisgl.quant.int4 import Int4CpuMethod

# Up to as many sequences as the int4 layers multiply natively (the module path's own limit): beyond that the
# layers expand their weights for dense matmuls, which the one-call layer does not.
MAX_BATCH = CPU_INT4_NATIVE_MAX_ROWS


def _int4(linear: Linear) -> native.Int4Weight | None:
    if linear.bias is not None or linear.tp.size != 1 or not isinstance(linear.method, Int4CpuMethod):
        return None
    qweight, sm = linear.qweight, linear.qscale_min
    if not (qweight.is_contiguous() and sm.is_contiguous() and sm.dtype == torch.float16):
        return None
    act_q8 = int(linear.method.int8_activations)
    return native.Int4Weight(qweight.data_ptr(), sm.data_ptr(), linear.out_features, linear.in_features, act_q8)


class CpuDecodeRunner:
    """Runs decode steps of one model: a `native.DecoderWeights` per layer, built once."""

    def __init__(self, model: LlamaForCausalLM, layers: list[native.DecoderWeights]):
        self.model = model
        self.layers = layers

    def can_run(self, batch: ForwardBatch) -> bool:
        """After the backend's prepare(batch): a decode step of at most MAX_BATCH sequences."""
        return isinstance(batch.attn_metadata, CpuDecodeMetadata) and batch.batch_size <= MAX_BATCH

    @torch.no_grad()
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """The model's forward on a decode batch: float32 logits for batch.logits_index."""
        model = self.model.model
        meta: CpuDecodeMetadata = batch.attn_metadata
        rope = model.rotary.lookup(batch.positions)
        h = model.embed_tokens(batch.input_ids).contiguous()
        cos, sin, out_loc = rope.cos.contiguous(), rope.sin.contiguous(), batch.out_loc.long().contiguous()
        slots, lens = meta.slots.contiguous(), meta.lens.contiguous()
        step = native.DecodeStep(cos.data_ptr(), sin.data_ptr(), out_loc.data_ptr(), slots.data_ptr(),
                                 lens.data_ptr(), batch.batch_size, slots.shape[1])  # fmt: skip
        residual = torch.empty_like(h)
        for i, weights in enumerate(self.layers):
            native.decoder_layer(weights, step, h, residual, first=i == 0)
        idx = batch.logits_index
        h = model.norm(h[idx] + residual[idx])
        return self.model.lm_head(h).float()


def build(model: nn.Module, pool: KVPool, backend: AttentionBackend) -> CpuDecodeRunner | None:
    """A CpuDecodeRunner for `model` (a LlamaForCausalLM), or None unless every layer qualifies: int4 weights in
    minisgl's CPU layout without biases, one rank, fp32 or bf16 (the KV cache that or fp16), no q/k norm, a gated
    MLP, and the cpu attention backend decoding natively (native kernels loaded, at either ISA level)."""
    if not isinstance(model, LlamaForCausalLM) or not native.available():
        return None
    if not (isinstance(backend, CpuBackend) and backend.native_decode):
        return None
    dtype = backend.dtype  # the activations'; the pool holds them or fp16 (backend.native_decode checked which)
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
                norms[0].data_ptr(),
                norms[1].data_ptr(),
                *linears,
                pool.k(i).data_ptr(),
                pool.v(i).data_ptr(),
                model.config.hidden_size,
                attn.num_q,
                attn.num_kv,
                attn.head_dim,
                mlp.down_proj.in_features,
                model.model.rotary.cos.shape[1],
                int(dtype == torch.bfloat16),
                int(pool.dtype == torch.float16),
                layer.input_layernorm.eps,
                backend.scale,
            )  # fmt: skip
        )
    return CpuDecodeRunner(model, layers)
