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

pytestmark = pytest.mark.slow  # the default model against transformers

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


CHATS_12 = CHATS + [
    "How many legs does a spider have?", "Give me a synonym for happy.", "What is 12 times 7?",
    "Translate 'good morning' into Spanish.", "Who wrote Romeo and Juliet?", "Describe a cat in five words.",
    "What color is the sky on a clear day?", "List two planets in our solar system.", "Why do leaves fall in autumn?",
]  # fmt: skip


@pytest.mark.slow
def test_default_model_4bit_in_float32_gives_the_files_logits(monkeypatch):
    """The default model's 4-bit blocks kept (the file's fp16 scales and mins) with fp32 activations: every
    prefill and decode logit equals transformers' reading of the same GGUF (which dequantizes it) up to
    summation order, and greedy decoding picks its tokens."""
    from minisgl.engine.engine import Engine

    path = default_model_path()
    hf = hf_gguf_model(path)
    llm = LLM(path, device="cpu", dtype="float32", disable_radix_cache=True)
    # The file's Q8_0 embedding is read from the tied head's int8 copy (no dense table in fp32): exactly its rows.
    embed = llm.scheduler.engine.model.model.embed_tokens
    assert embed.rows_from is not None and embed.weight.numel() == 0
    ids = torch.tensor([0, 1, 2, 17, 1000, 49151])
    assert torch.equal(embed(ids), hf.get_input_embeddings()(ids))
    tok = llm.tokenizer
    decode_logits: list[torch.Tensor] = []
    forward = Engine.forward

    def recording(self, batch):
        out = forward(self, batch)
        if batch.is_decode:
            decode_logits.append(out.clone())
        return out

    monkeypatch.setattr(Engine, "forward", recording)
    for chat in CHATS_12:
        text = tok.apply_chat_template([{"role": "user", "content": chat}], tokenize=False, add_generation_prompt=True)
        prompt = tok.encode(text, add_special_tokens=False)
        decode_logits.clear()
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
        ids = prompt + out.token_ids
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        steps = ref[len(prompt) - 1 : len(ids) - 1]
        assert out.token_ids == steps.argmax(-1).tolist(), chat
        assert len(decode_logits) == len(out.token_ids) - 1
        for i, got in enumerate(decode_logits):
            err = (got[0] - steps[i + 1]).abs().max().item()
            assert err <= 1e-3, f"{chat!r} decode step {i}: {err:.3g}"
        prefill, _ = engine_prefill_logits(llm, ids)
        err = (prefill - ref).abs().max().item()
        assert err <= 1e-3, f"{chat!r} prefill: {err:.3g}"
