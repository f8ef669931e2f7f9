"""Which quantization a model is built with, resolved from the `quantization` option and the checkpoint."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

SCHEMES = ("int8", "int4", "fp8")
KEEP_GGUF = "gguf"  # every weight keeps the precision its GGUF file stores it in
_PRECISION = {"int4": 0, "int8": 1}  # for fused layers whose parts a GGUF stores at different precisions


@dataclass(frozen=True)
class QuantConfig:
    """Passed to model constructors. Linear layers built with one defer allocating their weight until the
    model knows each layer's method (`CausalLM.bind_quant`), so no dense copy of a quantized layer is ever made.

    scheme: one of SCHEMES for every projection, or KEEP_GGUF, where `tensor_schemes` maps each HF weight name to
    the scheme its GGUF type maps to (None: stored unquantized, stays dense). Embeddings and norms are never
    quantized; the LM head only with `quantize_lm_head`, or under KEEP_GGUF when the file stores it quantized.

    int8_activations: CPU int4 and int8 layers (the latter with groups of 32: GGUF's Q8_0, such as a head) round
    the activations of their native matmuls to int8 per group of 32 and multiply in integers, as llama.cpp
    multiplies its 4- and 8-bit blocks by Q8 activations (about twice as fast; the engine sets it where the user
    left --dtype auto). Otherwise they multiply in fp32, exactly the file's weights.
    """

    scheme: str
    quantize_lm_head: bool = False
    tensor_schemes: Mapping[str, str | None] = field(default_factory=dict)
    int8_activations: bool = False

    def scheme_for(self, weight_names: Iterable[str], lm_head: bool = False) -> str | None:
        """The scheme of the layer that holds these HF weights (a fused layer holds several); None = dense."""
        if self.scheme != KEEP_GGUF:
            return self.scheme if self.quantize_lm_head or not lm_head else None
        schemes = [self.tensor_schemes.get(name) for name in weight_names]
        if not schemes or None in schemes:
            return "int8" if lm_head and self.quantize_lm_head else None
        return max(schemes, key=_PRECISION.__getitem__)  # a fused layer takes its most precise part's scheme


def ggml_scheme(type_name: str) -> str | None:
    """The scheme a GGUF tensor type keeps its weights in: 4-bit formats (Q4_0/Q4_1 exactly, K-quants and 5-bit
    ones requantized) as int4, 6/8-bit ones as int8 (4 bits would discard what the file chose to keep),
    float types dense."""
    if type_name in ("F32", "F16", "BF16"):
        return None
    return "int8" if type_name in ("Q8_0", "Q6_K") else "int4"


def resolve_quant_config(
    quantization: str | None, quantize_lm_head: bool, gguf_types: Mapping[str, str] | None, device: torch.device
) -> QuantConfig | None:
    """None / "auto": a GGUF keeps its own precision, anything else loads dense. "none": dense, GGUF weights
    dequantized. "int8" / "int4" / "fp8": quantize every projection at load time.

    gguf_types maps each tensor of a GGUF checkpoint to its GGML type name; None for any other checkpoint."""
    if quantization in (None, "auto"):
        if gguf_types is None:
            return None
        schemes = {name: ggml_scheme(t) for name, t in gguf_types.items()}
        return QuantConfig(KEEP_GGUF, quantize_lm_head, schemes) if any(schemes.values()) else None
    if quantization == "none":
        return None
    if quantization not in SCHEMES:
        raise ValueError(f"unknown quantization {quantization!r}; choose none, {', '.join(SCHEMES)}")
    if quantization == "fp8":
        from minisgl.quant.fp8 import fp8_supported

        if not fp8_supported(device):
            raise ValueError("fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+, e.g. H100)")
    return QuantConfig(quantization, quantize_lm_head)
