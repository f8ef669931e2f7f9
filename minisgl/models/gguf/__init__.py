"""GGUF checkpoints (llama.cpp's single-file format) as a model source.

A .gguf file carries the hyper-parameters as metadata, the tokenizer, and the weights (often block-quantized).
This module turns it into what the engine loads from any checkpoint: an HF config.json-style dict and a stream
of (HF parameter name, dense tensor) pairs, dequantized one tensor at a time; or, for a quantized model,
Q4_0/Q4_1/Q8_0 matrices as blocks in our quantized layouts (minisgl/quant/gguf_blocks.py), never dequantized.

One module per job: `reader` (header and tensor table), `config` (metadata -> config dict, rope scaling),
`dequant` (block formats -> float32), `weights` (names, Q/K layout, the weight stream), `tokenizer`.
"""

from minisgl.models.gguf.config import gguf_config
from minisgl.models.gguf.dequant import dequantize_raw
from minisgl.models.gguf.reader import is_gguf, read_gguf_header
from minisgl.models.gguf.tokenizer import load_gguf_tokenizer
from minisgl.models.gguf.weights import gguf_weight_types, iter_gguf_weights

__all__ = [
    "dequantize_raw",
    "gguf_config",
    "gguf_weight_types",
    "is_gguf",
    "iter_gguf_weights",
    "load_gguf_tokenizer",
    "read_gguf_header",
]
