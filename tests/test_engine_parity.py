"""The engine against transformers on identical tiny random weights (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from checkpoints import build_checkpoint
from engine_util import engine_prefill_logits, hf_model, random_prompts, teacher_forced_greedy

from minisgl import LLM, SamplingParams
from minisgl.kernels import native

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "qwen3_moe", "gpt_neox", "gpt_neox_serial"]
PROMPTS = random_prompts()
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module", params=ARCHS)
def arch_ckpt(request, tmp_path_factory):
    arch = request.param
    path = build_checkpoint(str(tmp_path_factory.mktemp(arch)), arch)
    return arch, path, hf_model(path)


def check_greedy(llm: LLM, hf, prompts=PROMPTS, params=GREEDY) -> None:
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        assert len(out.token_ids) == params.max_tokens
        assert out.finish_reason == "length"
        assert out.token_ids == teacher_forced_greedy(hf, prompt, out.token_ids), f"prompt of {len(prompt)} tokens"


def assert_no_leaks(llm: LLM) -> None:
    sched = llm.scheduler
    assert not sched.has_work()
    sched.kv.check_no_leaks()


@pytest.mark.parametrize("rope_form", ["classic", "parameters"])
def test_prefill_logits_match(arch_ckpt, rope_form, tmp_path):
    arch, _, _ = arch_ckpt
    path = build_checkpoint(str(tmp_path), arch, rope_form=rope_form)
    hf = hf_model(path)
    llm = LLM(path, device="cpu", dtype="float32", page_size=4)
    for prompt in (PROMPTS[0], PROMPTS[1], PROMPTS[5]):
        ours, _ = engine_prefill_logits(llm, prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        assert (ours - ref).abs().max().item() <= 1e-4
    assert_no_leaks(llm)


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {},
        {"chunked_prefill_size": 32, "page_size": 4},
        {"disable_radix_cache": True, "page_size": 16},
    ],
    ids=["defaults", "chunked32-page4", "no-radix"],
)
def test_greedy_matches_transformers(arch_ckpt, engine_kwargs):
    _, path, hf = arch_ckpt
    llm = LLM(path, device="cpu", dtype="float32", **engine_kwargs)
    check_greedy(llm, hf)
    assert_no_leaks(llm)


def test_greedy_matches_transformers_at_lower_isa_levels(arch_ckpt, lower_isa):
    _, path, hf = arch_ckpt
    llm = LLM(path, device="cpu", dtype="float32", page_size=4)
    check_greedy(llm, hf)


def test_torch_ops_fallback_matches_transformers(arch_ckpt, monkeypatch):
    """Without the native CPU kernels (no C++ compiler): torch ops in the layers and the torch attention backend."""
    monkeypatch.setattr(native, "_lib", lambda: None)
    _, path, hf = arch_ckpt
    llm = LLM(path, device="cpu", dtype="float32", page_size=4)
    assert type(llm.scheduler.engine.attn_backend).__name__ == "TorchBackend"
    check_greedy(llm, hf)
    assert_no_leaks(llm)


def test_small_pool_retracts_and_stays_exact(arch_ckpt):
    _, path, hf = arch_ckpt
    # 400 tokens cannot hold 12 prompts of up to 300 tokens plus 24 outputs each at once: requests get retracted.
    llm = LLM(path, device="cpu", dtype="float32", max_total_tokens=400, page_size=4, chunked_prefill_size=64)
    check_greedy(llm, hf, params=SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert llm.scheduler.stats().extra.get("retractions", 0) > 0
    assert_no_leaks(llm)


def test_radix_cache_serves_shared_prefixes(arch_ckpt):
    _, path, hf = arch_ckpt
    llm = LLM(path, device="cpu", dtype="float32", page_size=2)
    first = llm.generate(PROMPTS, GREEDY)
    before = llm.scheduler.stats().extra.get("cached_tokens", 0)
    # Second call: the same prompts, and prompts that extend a cached prompt with new tokens.
    extended = [p + [7, 8, 9] for p in PROMPTS[:4]]
    second = llm.generate(PROMPTS + extended, GREEDY)
    cached = llm.scheduler.stats().extra["cached_tokens"] - before
    assert cached >= sum(len(p) - 2 for p in PROMPTS)  # nearly every prompt token came from the cache
    assert [o.token_ids for o in first] == [o.token_ids for o in second[: len(PROMPTS)]]
    for prompt, out in zip(extended, second[len(PROMPTS) :]):
        assert out.token_ids == teacher_forced_greedy(hf, prompt, out.token_ids)
    assert_no_leaks(llm)
