"""Tensor parallelism on gloo (CPU): tp=2 must produce exactly the tokens tp=1 does."""

from __future__ import annotations

import time

import psutil
import pytest

from checkpoints import build_checkpoint
from engine_util import random_prompts
from minisgl import LLM, SamplingParams

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "qwen3_moe", "gpt_neox"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = random_prompts(n=6, hi=120)


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_equals_tp1(arch, tmp_path):
    path = build_checkpoint(str(tmp_path), arch)
    ref = LLM(path, device="cpu", dtype="float32", skip_tokenizer_init=True).generate(PROMPTS, GREEDY)
    llm = LLM(path, device="cpu", dtype="float32", tp_size=2, page_size=4, skip_tokenizer_init=True)
    try:
        out = llm.generate(PROMPTS, GREEDY)
    finally:
        llm.shutdown()
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]


def test_tp4_replicates_kv_heads(tmp_path):
    # 2 kv heads over 4 ranks: each kv head is held by two ranks.
    path = build_checkpoint(str(tmp_path), "qwen3")
    ref = LLM(path, device="cpu", dtype="float32", skip_tokenizer_init=True).generate(PROMPTS[:3], GREEDY)
    llm = LLM(path, device="cpu", dtype="float32", tp_size=4, skip_tokenizer_init=True)
    try:
        out = llm.generate(PROMPTS[:3], GREEDY)
    finally:
        llm.shutdown()
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]


def test_workers_exit_after_shutdown(tmp_path):
    path = build_checkpoint(str(tmp_path), "llama")
    llm = LLM(path, device="cpu", dtype="float32", tp_size=2, skip_tokenizer_init=True)
    workers = [psutil.Process(w.pid) for w in llm.scheduler.workers]
    llm.generate(PROMPTS[:2], GREEDY)
    llm.shutdown()
    deadline = time.time() + 30
    while any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
