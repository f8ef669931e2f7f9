"""GGUF checkpoints (llama.cpp's single-file format) as a model source.

A .gguf file carries the hyper-parameters as metadata, the tokenizer, and the weights (often block-quantized).
This module turns it into what the engine loads from any checkpoint: an HF config.json-style dict and a stream
of (HF parameter name, dense tensor) pairs, dequantized one tensor at a time; or, for a quantized model,
Q4_0/Q4_1/Q8_0 matrices as blocks in our quantized layouts (minisgl/quant/gguf_blocks.py), never dequantized.

The header is parsed here rather than with `gguf.GGUFReader` because that reader builds a Python object per
vocabulary string (~2 s for a 49k vocabulary); we only need the scalars and the tensor table. The file itself is
memory-mapped, so a tensor's bytes are read only while it is being dequantized.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from minisgl.quant.blocks import QuantizedBlocks
from minisgl.quant.gguf_blocks import MAPPED_TYPES, gguf_blocks

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

# (GGUF general.architecture) -> (HF architectures entry, HF model_type)
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}

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

_SUPPORTED_TYPES = {
    GGMLQuantizationType[t]
    for t in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
}

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class SkippedStrings:
    """Stands in for a metadata array of strings (vocabularies, merges) that the header parser does not decode."""

    length: int


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table. `shape` is in torch order (GGUF lists the fastest-varying dim first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """Metadata key/values and tensor table of a GGUF file."""

    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]


class _Cursor:
    """Little-endian reads from a bytes-like buffer at a moving position."""

    def __init__(self, buf: memoryview | bytes):
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            return self.array()
        return self.unpack(_SCALAR_FORMATS[GGUFValueType(vtype)])

    def array(self) -> Any:
        etype, n = self.unpack("<I"), self.unpack("<Q")
        if etype == GGUFValueType.STRING:
            for _ in range(n):  # only the lengths are needed to step over them
                self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
            return SkippedStrings(n)
        if etype == GGUFValueType.ARRAY:
            return [self.array() for _ in range(n)]
        dtype = np.dtype(_SCALAR_FORMATS[GGUFValueType(etype)].replace("?", "b1"))
        out = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()
        self.pos += n * dtype.itemsize
        return out.tolist()


def is_gguf(path: str) -> bool:
    """True when `path` is a regular file starting with the GGUF magic bytes."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == _MAGIC


def read_gguf_header(path: str) -> GGUFHeader:
    """Parse the metadata and tensor table of a GGUF file (cached per path, size and mtime)."""
    st = os.stat(path)
    return _read_header(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=4)
def _read_header(path: str, size: int, mtime_ns: int) -> GGUFHeader:
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mm))
    if bytes(cur.buf[:4]) != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file")
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        # Versions are tiny numbers; anything else means a big-endian file or the 32-bit-count GGUFv1.
        raise ValueError(f"{path}: unsupported GGUF version {version} (only little-endian v2/v3 are read)")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I"))
    raw = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
        raw.append((name, dims, GGMLQuantizationType(cur.unpack("<I")), cur.unpack("<Q")))
    align = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // align) * align
    tensors = {}
    for name, dims, qtype, offset in raw:
        block, type_size = GGML_QUANT_SIZES[qtype]
        nbytes = math.prod(dims) // block * type_size
        tensors[name] = GGUFTensorInfo(name, tuple(reversed(dims)), qtype, data_start + offset, nbytes)
    return GGUFHeader(metadata, tensors)


def _arch(meta: dict[str, Any]) -> str:
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {sorted(_ARCHITECTURES)}")
    return arch


def gguf_config(path: str) -> dict[str, Any]:
    """An HF config.json-style dict built from the GGUF metadata of `path`."""
    header = read_gguf_header(path)
    meta, tensors = header.metadata, header.tensors
    arch = _arch(meta)

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
    factors = dequantize_raw(_tensor_bytes(path, info), info.ggml_type, info.shape).double()
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


def _tensor_bytes(path: str, info: GGUFTensorInfo) -> np.ndarray:
    # Copy-on-write mapping: torch wants writable arrays, and nothing written through it reaches the file.
    return np.memmap(path, dtype=np.uint8, mode="c", offset=info.offset, shape=(info.nbytes,))


def dequantize_raw(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 tensor of `shape` from the raw bytes of one tensor."""
    if qtype not in _SUPPORTED_TYPES:
        raise ValueError(f"GGML type {qtype.name} is not supported")
    if qtype == GGMLQuantizationType.F32:
        return torch.from_numpy(raw.view(np.float32)).view(shape)
    fast = _FAST_DEQUANT.get(qtype)
    if fast is not None:
        return fast(torch.from_numpy(raw)).view(shape)
    from gguf.quants import dequantize

    block, type_size = GGML_QUANT_SIZES[qtype]
    rows = raw.reshape(-1, shape[-1] // block * type_size)
    return torch.from_numpy(np.ascontiguousarray(dequantize(rows, qtype), dtype=np.float32)).view(shape)


# Torch versions of the commonest block formats: gguf's numpy dequantizers are single-threaded and make several
# temporaries (2.5 s for SmolLM2-135M's Q4_1 weights); these compute the same float32 values (the tests check
# bit-equality against gguf.quants.dequantize) several times faster. Other types go through gguf.


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # Low nibbles hold a block's first 16 values, high nibbles its last 16.
    return torch.cat((qs & 0x0F, qs >> 4), dim=1).float()


def _dequant_q8_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 34)
    return _half(blocks, 0) * blocks[:, 2:].contiguous().view(torch.int8).float()


def _dequant_q4_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 18)
    return _half(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8.0)


def _dequant_q4_1(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 20)
    # Kept as a separate multiply and add (no fused addcmul) so rounding matches gguf's numpy exactly.
    scaled = _half(blocks, 0) * _nibbles(blocks[:, 4:])
    return scaled + _half(blocks, 2)


def _dequant_f16(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.float16).float()


def _dequant_bf16(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.bfloat16).float()


_FAST_DEQUANT = {
    GGMLQuantizationType.Q8_0: _dequant_q8_0,
    GGMLQuantizationType.Q4_0: _dequant_q4_0,
    GGMLQuantizationType.Q4_1: _dequant_q4_1,
    GGMLQuantizationType.F16: _dequant_f16,
    GGMLQuantizationType.BF16: _dequant_bf16,
}


def dequantize_tensor(path: str, info: GGUFTensorInfo) -> torch.Tensor:
    """One tensor of the file as float32 in torch shape order, without any name-specific transform."""
    return dequantize_raw(_tensor_bytes(path, info), info.ggml_type, info.shape)


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
    arch = _arch(header.metadata)
    n_heads = header.metadata[f"{arch}.attention.head_count"]
    n_kv = header.metadata.get(f"{arch}.attention.head_count_kv", n_heads)
    n_kv = max(n_kv) if isinstance(n_kv, list) else n_kv
    for info in header.tensors.values():
        name = hf_name(info.name)
        if name is None:
            continue
        w: torch.Tensor | QuantizedBlocks
        if keep_quantized and info.ggml_type in MAPPED_TYPES and len(info.shape) == 2:
            w = gguf_blocks(_tensor_bytes(path, info), info.ggml_type, info.shape)
        else:
            w = dequantize_tensor(path, info).to(dtype)
        if arch in _PERMUTED_QK_ARCHS and (".attn_q." in info.name or ".attn_k." in info.name):
            heads = n_heads if ".attn_q." in info.name else n_kv
            if isinstance(w, torch.Tensor):
                w = unpermute_qk(w, heads)
            else:
                w = w.map_rows(lambda t: unpermute_qk(t, heads))
        yield name, w


def load_gguf_tokenizer(path: str) -> Any:
    """The transformers tokenizer embedded in a GGUF file, with the file's chat template attached."""
    from transformers import AutoTokenizer

    path = os.path.abspath(path)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    if not getattr(tok, "chat_template", None):
        template = read_gguf_header(path).metadata.get("tokenizer.chat_template")
        if template:
            tok.chat_template = template
    return tok
