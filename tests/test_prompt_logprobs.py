"""Prompt logprobs against transformers on tiny random weights (fp32, CPU): every prompt token's log-probability
and top alternatives, in one batch of prompts of many lengths, through chunked prefill, and with the prompt
already in the prefix cache (which such a request must not use)."""

from __future__ import annotations

import pytest
import torch
from checkpoints import build_checkpoint
from engine_util import hf_model, random_prompts

from minisgl import LLM, SamplingParams
from minisgl.scheduler import prompt_logprobs

PROMPTS = random_prompts(n=6, lo=1, hi=90, seed=3)
K = 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = build_checkpoint(str(tmp_path_factory.mktemp("llama")), "llama")
    return path, hf_model(path)


@torch.no_grad()
def hf_prompt_logprobs(hf, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' log-probability of prompt tokens 1.., and the top K (values, ids) at each position."""
    logp = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].double(), dim=-1)[:-1]
    chosen = logp.gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    top = logp.topk(K, dim=-1)
    return chosen, top.values, top.indices


def prompt_outputs(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict[str, tuple]:
    """Run the prompts through the scheduler; each rid's prompt logprobs as its first output carries them."""
    sched = llm.scheduler
    for i, p in enumerate(prompts):
        sched.add_request(f"r{i}", p, params)
    found = {}
    while sched.has_work():
        for out in sched.step():
            if out.prompt_logprobs is not None:
                assert out.rid not in found, "sent twice"
                found[out.rid] = (out.prompt_logprobs, out.prompt_top_logprobs)
    sched.kv.check_no_leaks()
    return found


def check(found: dict, prompts: list[list[int]], hf) -> None:
    assert set(found) == {f"r{i}" for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        lps, tops = found[f"r{i}"]
        chosen, top_values, top_ids = hf_prompt_logprobs(hf, p)
        assert len(lps) == len(tops) == len(p) - 1
        torch.testing.assert_close(torch.tensor(lps, dtype=torch.float64), chosen, rtol=1e-4, atol=1e-4)
        for j, alts in enumerate(tops):
            torch.testing.assert_close(
                torch.tensor([v for _, v in alts], dtype=torch.float64), top_values[j], rtol=1e-4, atol=1e-4
            )
            # ids may swap only where their logprobs tie to within the tolerance
            assert [t for t, _ in alts][:1] == top_ids[j][:1].tolist() or abs(
                top_values[j][0] - top_values[j][1]
            ) < 1e-4


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("chunk,rows", [(4096, 256), (16, 256), (4096, 7)], ids=["whole", "chunked", "few-rows"])
def test_prompt_logprobs_match_transformers(ckpt, chunk, rows, device, monkeypatch):
    """`rows`: the logits rows a prefill batch may spend on prompt positions (a prompt then takes more chunks)."""
    monkeypatch.setattr(prompt_logprobs, "MAX_ROWS", rows)
    spent, record = [], prompt_logprobs.record
    monkeypatch.setattr(prompt_logprobs, "record", lambda *a: (spent.append(a[3].shape[0]), record(*a)))
    path, hf = ckpt
    llm = LLM(path, device=device, dtype="float32", page_size=4, chunked_prefill_size=chunk)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=K)
    check(prompt_outputs(llm, PROMPTS, params), PROMPTS, hf)
    assert max(spent) <= rows and sum(spent) == sum(len(p) - 1 for p in PROMPTS)


def test_prompt_logprobs_ignore_the_prefix_cache(ckpt):
    """The prompts are cached by a first run; asked again with prompt_logprobs they are computed whole, and a
    request without them still finds its prompt in the cache."""
    path, hf = ckpt
    llm = LLM(path, device="cpu", dtype="float32", page_size=2)
    plain = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    first = llm.generate(PROMPTS, plain)
    before = llm.scheduler.stats().extra.get("cached_tokens", 0)
    check(prompt_outputs(llm, PROMPTS, SamplingParams(**{**vars(plain), "prompt_logprobs": K})), PROMPTS, hf)
    assert llm.scheduler.stats().extra.get("cached_tokens", 0) == before
    again = llm.generate(PROMPTS, plain)
    assert [o.token_ids for o in again] == [o.token_ids for o in first]
    assert llm.scheduler.stats().extra["cached_tokens"] > before
