"""GGUF checkpoints (llama.cpp's single-file format) as a model source.

A .gguf file carries the hyper-parameters as metadata, the tokenizer, and the weights (often block-quantized).
This module turns it into what the engine loads from any checkpoint: an HF config.json-style dict and a stream
of (HF parameter name, dense tensor) pairs, dequantized one tensor at a time; or, for a quantized model,
Q4_0/Q4_1/Q8_0 matrices as blocks in our quantized layouts (minisgl/quant/gguf_blocks.py), never dequantized.

One module per job: `reader` (header and tensor table), `config` (metadata -> config dict, rope scaling),
`dequant` (block formats -> float32), `weights` (names, Q/K layout, the weight stream), `tokenizer`.
"""

import importlib

# Imported when first used (PEP 562): the tokenizer process reads a file's tokenizer without loading torch,
# which the weight modules need.
_MODULES = {
    "dequantize_raw": "dequant",
    "gguf_config": "config",
    "gguf_weight_types": "weights",
    "is_gguf": "reader",
    "iter_gguf_weights": "weights",
    "load_gguf_tokenizer": "tokenizer",
    "read_gguf_header": "reader",
}
__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
