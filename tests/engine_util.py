"""Helpers shared by the engine tests: reference outputs from transformers, prompts, engine logits."""

from __future__ import annotations

import random

import torch

from minisgl.core.forward_batch import ForwardMode
from minisgl.sampling_params import SamplingParams
from minisgl.scheduler.batch import make_forward_batch
from minisgl.scheduler.req import Req


def random_prompts(n: int = 12, lo: int = 3, hi: int = 300, vocab: int = 384, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lens = [lo, hi] + [rng.randint(lo, hi) for _ in range(n - 2)]
    return [[rng.randrange(3, vocab) for _ in range(k)] for k in lens]


def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def teacher_forced_greedy(hf, prompt: list[int], generated: list[int]) -> list[int]:
    """What transformers would pick at each step, given the prompt and the tokens we generated so far."""
    ids = torch.tensor([prompt + generated])
    logits = hf(ids).logits[0]
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)].argmax(-1).tolist()


@torch.no_grad()
def engine_prefill_logits(llm, prompt: list[int]) -> torch.Tensor:
    """Logits at every prompt position, computed by the engine's real paged forward path."""
    sched = llm.scheduler
    req = Req("logits", 0, list(prompt), SamplingParams(), 0, len(prompt) + 1)
    sched.kv.admit(req)
    assert req.num_computed == 0, "prompt is already in the prefix cache: use a fresh LLM or disable_radix_cache"
    n = len(prompt)
    assert sched.kv.reserve(req, len(prompt))
    batch = make_forward_batch(ForwardMode.EXTEND, [req], [n], [True], sched.kv.page_table, sched.kv.page_size)
    batch.logits_index = torch.arange(n, device=batch.input_ids.device)
    logits = sched.engine.forward(batch)
    req.num_computed = len(prompt)
    sched.kv.release(req)
    return logits.cpu(), req
