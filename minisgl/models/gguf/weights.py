"""GGUF tensors as HF-named weights: llama.cpp's names mapped to HF's, Q/K rows un-permuted, quantized blocks
kept as they are (minisgl/quant/gguf_blocks.py) or dequantized one tensor at a time."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from minisgl.models.gguf.config import architecture
from minisgl.models.gguf.dequant import dequantize_tensor
from minisgl.models.gguf.reader import read_gguf_header, tensor_bytes
from minisgl.quant.blocks import QuantizedBlocks
from minisgl.quant.gguf_blocks import MAPPED_TYPES, gguf_blocks

# llama.cpp stores llama Q/K rows interleaved per head for its rope kernel; qwen2/qwen3 converters skip that.
_PERMUTED_QK_ARCHS = {"llama"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Tensors llama.cpp adds that are not HF parameters (their content lives in the config instead).
_SKIPPED = {"rope_freqs.weight"}


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name for a GGUF tensor name, or None for tensors with no HF counterpart."""
    if gguf_name in _SKIPPED:
        return None
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no known HF name (unsupported model variant?)")


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation. Its converter reshapes rows to (n_head, 2, head_dim/2) and swaps the
    last two axes, interleaving the two rotary halves; this is the inverse (head_dim/2, 2) -> (2, head_dim/2)."""
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def gguf_weight_types(path: str) -> dict[str, str]:
    """HF name -> GGML type name (e.g. "Q4_1") of every matrix in the file."""
    tensors = read_gguf_header(path).tensors.values()
    return {hf_name(i.name): i.ggml_type.name for i in tensors if len(i.shape) == 2 and hf_name(i.name)}


def iter_gguf_weights(
    path: str, dtype: torch.dtype, keep_quantized: bool = False
) -> Iterator[tuple[str, torch.Tensor | QuantizedBlocks]]:
    """Yield (HF name, tensor of `dtype`) for every weight in the GGUF file, one tensor materialized at a time.

    With `keep_quantized`, Q4_0/Q4_1/Q8_0 matrices are yielded as Int4Blocks/Int8Blocks instead (whoever needs
    them dense calls `dequantize()`). Tied checkpoints yield no lm_head.weight (see
    `gguf_config()["tie_word_embeddings"]`). float32 tensors stored as F32 may be yielded as views of the
    memory-mapped (copy-on-write) file rather than copies.
    """
    header = read_gguf_header(path)
    arch = architecture(header.metadata)
    n_heads = header.metadata[f"{arch}.attention.head_count"]
    n_kv = header.metadata.get(f"{arch}.attention.head_count_kv", n_heads)
    n_kv = max(n_kv) if isinstance(n_kv, list) else n_kv
    for info in header.tensors.values():
        name = hf_name(info.name)
        if name is None:
            continue
        w: torch.Tensor | QuantizedBlocks
        if keep_quantized and info.ggml_type in MAPPED_TYPES and len(info.shape) == 2:
            w = gguf_blocks(tensor_bytes(path, info), info.ggml_type, info.shape)
        else:
            w = dequantize_tensor(path, info).to(dtype)
        if arch in _PERMUTED_QK_ARCHS and (".attn_q." in info.name or ".attn_k." in info.name):
            heads = n_heads if ".attn_q." in info.name else n_kv
            if isinstance(w, torch.Tensor):
                w = unpermute_qk(w, heads)
            else:
                w = w.map_rows(lambda t: unpermute_qk(t, heads))
        yield name, w
