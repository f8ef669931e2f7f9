"""The whole engine with attention_backend="triton" on the CPU, its kernels under Triton's interpreter.

The interpreter is slow, so this runs a 2-layer model on a few short prompts; it still covers what the
kernel tests cannot: the backend's prepare/forward wiring, chunked prefill on top of cached pages, radix
prefix reuse, and multi-step decode, checked against transformers on the same weights.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from checkpoints import build_checkpoint  # noqa: E402
from engine_util import engine_prefill_logits, hf_model, random_prompts, teacher_forced_greedy  # noqa: E402

from minisgl import LLM, SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow  # Triton kernels in the interpreter

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = build_checkpoint(str(tmp_path_factory.mktemp("qwen3")), "qwen3")
    return path, hf_model(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA engine tests cover this natively")
def test_engine_with_triton_backend_matches_transformers(qwen3):
    path, hf = qwen3
    llm = LLM(path, device="cpu", dtype="float32", attention_backend="triton", page_size=4, chunked_prefill_size=32)
    assert type(llm.scheduler.engine.attn_backend).__name__ == "TritonBackend"
    prompts = random_prompts(n=4, lo=3, hi=70, seed=1)
    prompts.append(prompts[1][:40] + [5, 6, 7])  # shares 40 tokens (10 pages) with a prompt served before it

    ours, _ = engine_prefill_logits(llm, prompts[1])
    with torch.no_grad():
        ref = hf(torch.tensor([prompts[1]])).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-4

    outs = llm.generate(prompts[:4], GREEDY) + llm.generate(prompts[4:], GREEDY)
    assert llm.scheduler.stats().extra.get("cached_tokens", 0) >= 40
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == teacher_forced_greedy(hf, prompt, out.token_ids), f"prompt of {len(prompt)} tokens"
    assert not llm.scheduler.has_work()
    llm.scheduler.kv.check_no_leaks()
