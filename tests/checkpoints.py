"""Tiny random-weight checkpoints for tests: config.json + safetensors + a real `tokenizers` tokenizer.

Nothing here touches the network. Each builder writes a HuggingFace-format directory that both
transformers and minisgl can load, so tests compare the two on identical weights.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

import torch

CHAT_TEMPLATE = (  # `system_note`: a template variable, as a request's chat_template_kwargs may set
    "{% if system_note is defined %}<|im_start|>system\n{{ system_note }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 384

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Large language models generate text one token at a time.",
    "A radix tree shares common prefixes between many sequences.",
    "héllo wörld, naïve café, 東京, 😀 emoji and multi-byte text.",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time there was a small engine that served tokens quickly.",
]

# Small shapes, but with GQA (4 q heads over 2 kv heads) and head_dim 16 so every code path is exercised.
BASE = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=0,
    tie_word_embeddings=False,
)

ARCH_CONFIGS: dict[str, dict] = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama"),
    "llama3": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        tie_word_embeddings=True,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3"),
    "qwen3_moe": dict(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "gpt_neox": dict(
        architectures=["GPTNeoXForCausalLM"],
        model_type="gpt_neox",
        rotary_pct=0.25,
        layer_norm_eps=1e-5,
        use_parallel_residual=True,
        hidden_act="gelu",
        attention_bias=True,
    ),
}
ARCH_CONFIGS["gpt_neox_serial"] = {**ARCH_CONFIGS["gpt_neox"], "use_parallel_residual": False}


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    assert tok.get_vocab_size() <= VOCAB_SIZE
    return tok.to_str()


def write_tokenizer(path: str) -> None:
    """Write tokenizer.json + tokenizer_config.json (ChatML template) into `path`."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write(_tokenizer_json())
    cfg = dict(
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token="<|im_start|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        add_bos_token=False,
    )
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)


def arch_config(arch: str, **overrides) -> dict:
    cfg = {**BASE, **ARCH_CONFIGS[arch], **overrides}
    if arch.startswith("gpt_neox"):  # GPT-NeoX names a few things differently and has no GQA
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
        cfg.pop("rms_norm_eps", None)
        cfg.pop("head_dim", None)
        cfg["rotary_emb_base"] = cfg.pop("rope_theta")
    return cfg


def to_rope_parameters(cfg: dict) -> dict:
    """Rewrite a classic config (rope_theta / rope_scaling) into the newer `rope_parameters` form."""
    cfg = dict(cfg)
    params = dict(cfg.pop("rope_scaling", None) or {"rope_type": "default"})
    params["rope_theta"] = cfg.pop("rope_theta", cfg.pop("rotary_emb_base", 10000.0))
    cfg["rope_parameters"] = params
    return cfg


def build_checkpoint(path: str, arch: str = "llama", seed: int = 0, rope_form: str = "classic", **overrides) -> str:
    """Create a random-weight checkpoint of `arch` in `path` with transformers itself and return `path`.

    Weights are scaled up from the tiny default init so logits are not all near-uniform (greedy ties would
    make token comparisons meaningless). rope_form "parameters" writes config.json in the newer form.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = arch_config(arch, **overrides)
    os.makedirs(path, exist_ok=True)
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    config.architectures = cfg["architectures"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if p.dim() == 1 and "bias" not in name else p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path)
    # transformers >= 5 writes `rope_parameters` itself; rewrite config.json into the form asked for.
    with open(os.path.join(path, "config.json")) as f:
        on_disk = json.load(f)
    on_disk.pop("rope_parameters", None)
    on_disk.pop("partial_rotary_factor", None) if "rotary_pct" in cfg else None
    for k in ("rope_theta", "rope_scaling", "rotary_emb_base", "rotary_pct"):
        if k in cfg:
            on_disk[k] = cfg[k]
    if rope_form == "parameters":
        on_disk = to_rope_parameters(on_disk)
        if "rotary_pct" in on_disk:
            on_disk["partial_rotary_factor"] = on_disk.pop("rotary_pct")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(on_disk, f, indent=1)
    return path
