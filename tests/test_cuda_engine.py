"""The engine on CUDA: the Triton backend (and FlashInfer's, where installed) against the torch backend and
transformers, CUDA-graph decode against eager decode, overlap scheduling against none. GPU only.

On CUDA both backends run the Triton norm / rope / SiLU / KV-store kernels (the layers dispatch on the
device), so the float32 runs are also checked against transformers on the CPU, an independent reference.
"""

from __future__ import annotations

import gc
import os
import random

import pytest
import torch
from checkpoints import build_checkpoint
from engine_util import hf_model, random_prompts, teacher_forced_greedy

from minisgl import LLM, SamplingParams
from minisgl.core.forward_batch import ForwardMode
from minisgl.scheduler.batch import make_forward_batch
from minisgl.scheduler.req import Req

pytestmark = pytest.mark.gpu

PROMPTS = random_prompts()  # 12 prompts of 3..300 tokens
QWEN3_06B = os.path.join(os.path.dirname(__file__), "..", "benchmark", "configs", "qwen3-0.6b")
# Every engine here gets a small pool: many are built in one process, and a default pool takes most of the GPU.
TINY = dict(device="cuda", dtype="float32", max_total_tokens=16384, cuda_graph_max_bs=16)


def run(path: str, prompts, params, **kwargs) -> tuple[list[list[int]], dict, bool]:
    """(token ids per prompt, scheduler counters, whether decode ran through CUDA graphs); frees the engine."""
    llm = LLM(path, **{**TINY, **kwargs})
    try:
        outs = llm.generate(prompts, params)
        sched = llm.scheduler
        assert not sched.has_work()
        sched.kv.check_no_leaks()
        return [o.token_ids for o in outs], dict(sched.stats().extra), sched.engine.graph_runner is not None
    finally:
        del llm
        gc.collect()
        torch.cuda.empty_cache()


@pytest.fixture(scope="module", params=["llama", "qwen3", "gpt_neox"])
def tiny_ckpt(request, tmp_path_factory):
    path = build_checkpoint(str(tmp_path_factory.mktemp(request.param)), request.param)
    return path, hf_model(path)


@pytest.mark.parametrize("page_size", [1, 16])
def test_triton_greedy_equals_torch_and_transformers(tiny_ckpt, page_size):
    path, hf = tiny_ckpt
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    # 400 tokens cannot hold 12 prompts of up to 300 tokens and 24 outputs each: requests get retracted.
    kwargs = dict(page_size=page_size, chunked_prefill_size=32, max_total_tokens=400)
    ours, stats, _ = run(path, PROMPTS, greedy, attention_backend="triton", **kwargs)
    theirs, _, _ = run(path, PROMPTS, greedy, attention_backend="torch", **kwargs)
    assert stats.get("retractions", 0) > 0
    assert ours == theirs
    for prompt, tokens in zip(PROMPTS, ours):
        assert tokens == teacher_forced_greedy(hf, prompt, tokens), f"prompt of {len(prompt)} tokens"


@pytest.mark.parametrize("arch", ["qwen3", "gpt_neox"])
def test_decode_graph_replay_equals_eager(arch, tmp_path):
    path = build_checkpoint(str(tmp_path), arch)
    prompts = random_prompts(n=13, lo=3, hi=200, seed=2)  # 13 rows: the bs-16 graph pads 3 of them
    greedy = [SamplingParams(temperature=0, max_tokens=4 + i, ignore_eos=True) for i in range(13)]
    sampled = [
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20 - i, seed=i, ignore_eos=True) for i in range(13)
    ]
    for params in (greedy, sampled):
        eager, _, eager_graphs = run(path, prompts, params, page_size=16, cuda_graph_max_bs=0)
        graphed, _, graphs = run(path, prompts, params, page_size=16, cuda_graph_max_bs=32)
        assert graphs and not eager_graphs
        assert graphed == eager


@pytest.mark.parametrize("max_total_tokens", [16384, 400], ids=["roomy", "retracting"])
def test_overlap_scheduling_changes_nothing(max_total_tokens, tmp_path):
    path = build_checkpoint(str(tmp_path), "qwen3")
    params = [SamplingParams(temperature=0.7, max_tokens=6 + i % 5, seed=i, ignore_eos=True) for i in range(12)]
    kwargs = dict(page_size=4, chunked_prefill_size=64, max_total_tokens=max_total_tokens)
    overlapped, _, _ = run(path, PROMPTS, params, **kwargs)
    serial, _, _ = run(path, PROMPTS, params, disable_overlap_schedule=True, **kwargs)
    assert overlapped == serial


# ---- Qwen3-0.6B shapes in bfloat16 ------------------------------------------------------------------


@torch.inference_mode()
def step_logits(llm: LLM, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits of three steps over all prompts at once: a prefill of each prompt's first half, an extend of
    the rest but one token on top of that cached half, and a decode of the last token (graphed if enabled)."""
    sched = llm.scheduler
    ps = sched.kv.page_size
    reqs = [Req(f"r{i}", 0, list(p), SamplingParams(), 0, len(p) + 1) for i, p in enumerate(prompts)]
    for r in reqs:
        sched.kv.admit(r)
        assert r.num_computed == 0 and sched.kv.reserve(r, len(r.prompt_ids))
    halves = [len(p) // 2 for p in prompts]
    plan = [
        (ForwardMode.EXTEND, halves),
        (ForwardMode.EXTEND, [len(p) - 1 - h for p, h in zip(prompts, halves)]),
        (ForwardMode.DECODE, [1] * len(prompts)),
    ]
    logits = []
    for mode, lens in plan:
        batch = make_forward_batch(mode, reqs, lens, [True] * len(reqs), sched.kv.page_table, ps)
        logits.append(sched.engine.forward(batch).float().cpu())
        for r, n in zip(reqs, lens):
            r.num_computed += n
    for r in reqs:
        sched.kv.release(r)
    return logits


QWEN3_COMMON = dict(
    skip_tokenizer_init=True,
    load_format="dummy",
    device="cuda",
    dtype="bfloat16",
    page_size=16,
    max_total_tokens=8192,
    chunked_prefill_size=4096,
    cuda_graph_max_bs=8,
)


def qwen3_06b_step_logits(backend: str) -> list[torch.Tensor]:
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 150000) for _ in range(n)] for n in (3, 9, 130, 700, 1500)]
    llm = LLM(QWEN3_06B, attention_backend=backend, **QWEN3_COMMON)
    try:
        return step_logits(llm, prompts)
    finally:
        del llm
        gc.collect()
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def qwen3_06b_torch_logits():
    return qwen3_06b_step_logits("torch")


@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_qwen3_06b_bf16_logits_match_torch_backend(backend, qwen3_06b_torch_logits):
    """Prefill, extend over a cached half (page lists that start mid-page) and decode, head_dim 128, GQA 16/8."""
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")
    ours_all = qwen3_06b_step_logits(backend)
    for step, (ours, ref) in enumerate(zip(ours_all, qwen3_06b_torch_logits)):
        assert ref.std() > 0 and torch.isfinite(ours).all()
        rel = ((ours - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
        cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min().item()
        assert rel <= 3e-2 and cos >= 0.999, f"step {step}: relative L2 error {rel:.4f}, cosine {cos:.5f}"
