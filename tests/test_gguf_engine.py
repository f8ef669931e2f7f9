"""The engine running GGUF files, against transformers running the same file: tiny random GGUFs (fp32 logits
and greedy tokens) and the embedded SmolLM2-135M-Instruct (greedy chat answers, token for token and as text)."""

from __future__ import annotations

import pytest
import torch
from checkpoints import VOCAB_SIZE, build_checkpoint
from engine_util import engine_prefill_logits, random_prompts, teacher_forced_greedy
from gguf import GGMLQuantizationType as Q
from test_gguf import hf_gguf_model, write_gguf

from minisgl import LLM, SamplingParams
from minisgl.models.default_model import default_model_path

PROMPTS = random_prompts(n=4, hi=60, vocab=VOCAB_SIZE, seed=11)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_gguf(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ckpt = build_checkpoint(str(root / "hf"), request.param, seed=3)
    path = write_gguf(ckpt, str(root / "model.gguf"), (Q.F32, Q.Q8_0, Q.Q4_0))
    return path, hf_gguf_model(path)


def test_tiny_gguf_logits_and_greedy_match_transformers(tiny_gguf):
    path, hf = tiny_gguf
    # Dequantized to float32 (--quantization none): the same weights as transformers', so fp32-exact.
    llm = LLM(path, device="cpu", dtype="float32", quantization="none", skip_tokenizer_init=True)
    for prompt in PROMPTS[:2]:
        ours, _ = engine_prefill_logits(llm, prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        assert (ours - ref).abs().max().item() <= 1e-4
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, GREEDY)):
        assert out.token_ids == teacher_forced_greedy(hf, prompt, out.token_ids)


CHATS = ["What is the capital of France?", "Name three primary colors.", "Write one sentence about the sea."]


def test_default_model_chats_like_transformers():
    path = default_model_path()
    hf = hf_gguf_model(path)
    llm = LLM(path, device="cpu", dtype="float32", quantization="none")
    tok = llm.tokenizer
    chats = [[{"role": "user", "content": c}] for c in CHATS]
    texts = [tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == teacher_forced_greedy(hf, prompt, out.token_ids)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=len(out.token_ids), do_sample=False)
        assert out.text == tok.decode(ref[0, len(prompt) :].tolist(), skip_special_tokens=True)
    assert "Paris" in outs[0].text
