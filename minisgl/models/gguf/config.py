"""A GGUF's metadata as an HF config.json-style dict, rope scaling included (llama.cpp keeps Llama-3's only as
per-frequency factors, from which the parameters are recovered)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from minisgl.models.gguf.dequant import dequantize_raw
from minisgl.models.gguf.reader import GGUFHeader, read_gguf_header, tensor_bytes

# (GGUF general.architecture) -> (HF architectures entry, HF model_type)
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}


def architecture(meta: dict[str, Any]) -> str:
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {sorted(_ARCHITECTURES)}")
    return arch


def gguf_config(path: str) -> dict[str, Any]:
    """An HF config.json-style dict built from the GGUF metadata of `path`."""
    header = read_gguf_header(path)
    meta, tensors = header.metadata, header.tensors
    arch = architecture(meta)

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    hidden = get("embedding_length")
    n_heads = get("attention.head_count")
    n_kv = get("attention.head_count_kv", n_heads)
    # Some converters write per-layer head counts as arrays; the engine needs one number.
    n_kv = max(n_kv) if isinstance(n_kv, list) else n_kv
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // n_heads
    # The embedding's row count is what the weights actually have; the vocab_size key is optional.
    vocab = tensors["token_embd.weight"].shape[0] if "token_embd.weight" in tensors else get("vocab_size")
    hf_arch, model_type = _ARCHITECTURES[arch]
    cfg: dict[str, Any] = dict(
        architectures=[hf_arch],
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=get("context_length", 2048),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
    )
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if "tokenizer.ggml.padding_token_id" in meta:
        cfg["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]
    # Chat models often stop on an end-of-turn token distinct from eos; the engine stops on every listed id.
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and cfg["eos_token_id"] is not None and eot != cfg["eos_token_id"]:
        cfg["eos_token_id"] = [cfg["eos_token_id"], eot]
    rope_scaling = _rope_scaling(path, header, arch, cfg)
    if rope_scaling:
        cfg["rope_scaling"] = rope_scaling
    return cfg


def _rope_scaling(path: str, header: GGUFHeader, arch: str, cfg: dict[str, Any]) -> dict[str, Any] | None:
    meta = header.metadata
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in ("linear", "yarn"):
        out: dict[str, Any] = {"rope_type": kind, "factor": float(meta[f"{arch}.rope.scaling.factor"])}
        orig = meta.get(f"{arch}.rope.scaling.original_context_length")
        if orig is not None:
            out["original_max_position_embeddings"] = int(orig)
        return out
    if kind not in (None, "none"):
        raise ValueError(f"{path}: rope scaling type {kind!r} is not supported")
    info = header.tensors.get("rope_freqs.weight")
    if info is None:
        return None
    # llama.cpp writes Llama-3 rope scaling only as per-frequency wavelength factors; recover the parameters.
    factors = dequantize_raw(tensor_bytes(path, info), info.ggml_type, info.shape).double()
    return _llama3_from_factors(factors, cfg["rope_theta"], cfg["head_dim"])


def _llama3_from_factors(factors: torch.Tensor, theta: float, head_dim: int) -> dict[str, Any] | None:
    """Llama-3 rope parameters reproducing llama.cpp's `rope_freqs` factors exactly.

    Llama-3 scaling multiplies each wavelength by 1 (short), `factor` (long) or 1/((1-s)/factor + s) in between,
    with s = (orig_ctx/wavelength - low)/(high - low). (orig_ctx, low, high) only matter through the two ratios,
    so low_freq_factor is fixed at 1 and the others come from a line fit of s against 1/wavelength.
    """
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return None
    inv_wavelen = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim) / (2 * math.pi)
    mid = (factors > 1.0 + 1e-4) & (factors < factor * (1 - 1e-4))
    if int(mid.sum()) < 2:
        raise ValueError("rope_freqs has fewer than two interpolated frequencies; cannot recover Llama-3 scaling")
    s = (1.0 / factors[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
    x = inv_wavelen[mid]
    slope, intercept = np.polyfit(x.numpy(), s.numpy(), 1)  # s = orig/(high-1) * x - 1/(high-1)
    high = 1.0 - 1.0 / intercept
    orig = slope * (high - 1.0)
    wavelen = 1.0 / inv_wavelen
    smooth = ((orig / wavelen - 1.0) / (high - 1.0)).clamp(0.0, 1.0)
    refit = 1.0 / ((1.0 - smooth) / factor + smooth)
    if not torch.allclose(refit, factors, rtol=1e-3):
        raise ValueError("rope_freqs does not follow the Llama-3 scaling rule; not supported")
    return dict(
        rope_type="llama3",
        factor=factor,
        low_freq_factor=1.0,
        high_freq_factor=float(high),
        original_max_position_embeddings=float(orig),
    )
