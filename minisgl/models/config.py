"""The model hyper-parameters the engine needs, parsed from a HuggingFace config.json (either rope form)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from minisgl.kernels import native
from minisgl.layers.rotary import RopeConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture-independent view of a checkpoint's config. `hf` keeps the raw dict for model specifics."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    torch_dtype: torch.dtype | None
    hf: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def max_model_len(self) -> int:
        return self.max_position_embeddings


def _rope_from_hf(cfg: dict[str, Any], head_dim: int) -> RopeConfig:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        params = params.get("full_attention") or next(iter(params.values()))  # per-layer-type form
    if params:
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    else:
        theta = cfg.get("rope_theta", cfg.get("rotary_emb_base", 10000.0))
        scaling = dict(cfg.get("rope_scaling") or {})
        partial = cfg.get("partial_rotary_factor", cfg.get("rotary_pct"))
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        scaling = {}
    rotary_dim = int(head_dim * partial) if partial is not None else head_dim
    return RopeConfig(theta=float(theta), rotary_dim=rotary_dim, scaling=scaling or None)


def _eos_ids(model_dir: str | None, cfg: dict[str, Any]) -> tuple[int, ...]:
    """EOS ids from generation_config.json when present (it is what chat models stop on), else config.json."""
    eos: Any = None
    if model_dir:
        gen_path = os.path.join(model_dir, "generation_config.json")
        if os.path.exists(gen_path):
            with open(gen_path) as f:
                eos = json.load(f).get("eos_token_id")
    if eos is None:
        eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def model_config_from_dict(cfg: dict[str, Any], model_dir: str | None = None) -> ModelConfig:
    archs = cfg.get("architectures") or []
    if not archs:
        raise ValueError("config.json has no `architectures` entry; cannot choose a model class")
    num_q_heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // num_q_heads
    torch_dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    return ModelConfig(
        architecture=archs[0],
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg.get("intermediate_size", 4 * hidden),
        num_layers=cfg["num_hidden_layers"],
        num_q_heads=num_q_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_q_heads,
        head_dim=head_dim,
        norm_eps=cfg.get("rms_norm_eps", cfg.get("layer_norm_eps", 1e-6)),
        rope=_rope_from_hf(cfg, head_dim),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_ids=_eos_ids(model_dir, cfg),
        torch_dtype=DTYPES.get(torch_dtype) if isinstance(torch_dtype, str) else None,
        hf=cfg,
    )


def load_model_config(model_path: str) -> ModelConfig:
    """Read config.json from a checkpoint directory, or the metadata of a .gguf file."""
    if model_path.endswith(".gguf"):
        from minisgl.models.gguf import gguf_config

        return model_config_from_dict(gguf_config(model_path), None)
    with open(os.path.join(model_path, "config.json")) as f:
        return model_config_from_dict(json.load(f), model_path)


def resolve_dtype(name: str, config: ModelConfig, device: torch.device) -> torch.dtype:
    """`auto` is the checkpoint's dtype on GPU (bf16 if unknown). On CPU it is bfloat16 where the CPU computes
    it natively (AMX/AVX512-BF16), else float32, because emulated bf16 matmuls are slower than fp32."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose auto, bfloat16, float16 or float32")
        return DTYPES[name]
    if device.type == "cpu":
        return torch.bfloat16 if native.has_native_bf16() else torch.float32
    dtype = config.torch_dtype or torch.bfloat16
    return torch.bfloat16 if dtype == torch.float32 else dtype
