"""The scheduler's policy on a fake engine: no model, so each rule is checked in isolation and fast.

The fake engine's greedy choice after token t is (t + 1) % VOCAB, so every request's output is known from its
prompt alone, whatever shares its batch, however its prefill is chunked and however often it is retracted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from minisgl.core.forward_batch import ForwardBatch
from minisgl.engine.config import EngineConfig
from minisgl.engine.sampling import PendingTokens, SamplingBatch, TokenMask, sample
from minisgl.sampling_params import SamplingParams
from minisgl.scheduler.scheduler import Scheduler

VOCAB = 50


@dataclass
class FakeEngine:
    num_pages: int
    config: EngineConfig
    batches: list[ForwardBatch] = field(default_factory=list)
    tp: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(size=1))
    device: torch.device = torch.device("cpu")
    page_size: int = 1
    max_model_len: int = 64
    model_config: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(eos_token_ids=(), vocab_size=VOCAB))

    @property
    def chunked_prefill_size(self) -> int:
        return self.config.chunked_prefill_size or 2048

    @property
    def pool(self) -> SimpleNamespace:
        return SimpleNamespace(num_pages=self.num_pages)

    def sample(self, logits: torch.Tensor, batch: SamplingBatch, mask: TokenMask | None = None) -> PendingTokens:
        return PendingTokens(sample(logits, batch, mask))

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        self.batches.append(batch)
        last = batch.input_ids[batch.logits_index]
        logits = torch.zeros(len(last), VOCAB)
        logits[torch.arange(len(last)), (last + 1) % VOCAB] = 1.0
        return logits


def _run(engine: FakeEngine, prompts: list[list[int]], max_tokens: int) -> tuple[dict[str, list[int]], Scheduler]:
    scheduler = Scheduler(engine)
    for i, prompt in enumerate(prompts):
        scheduler.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while scheduler.has_work():
        for o in scheduler.step():
            out[o.rid] += o.token_ids
    return out, scheduler


def _expected(prompt: list[int], n: int) -> list[int]:
    return [(prompt[-1] + k) % VOCAB for k in range(1, n + 1)]


def _config(**kw) -> EngineConfig:
    return EngineConfig(device="cpu", disable_overlap_schedule=True, **kw)


def test_chunked_prefill_takes_the_budget_per_step():
    engine = FakeEngine(200, _config(chunked_prefill_size=8, max_running_requests=4))
    prompt = list(range(20))
    out, _ = _run(engine, [prompt], 3)
    assert out["r0"] == _expected(prompt, 3)
    extends = [b for b in engine.batches if not b.is_decode]
    assert [b.num_tokens for b in extends] == [8, 8, 4]


def test_a_long_prompt_alternates_with_decode_steps():
    """While a prompt is prefilled chunk by chunk, the running request decodes between its chunks."""
    engine = FakeEngine(200, _config(chunked_prefill_size=8, max_running_requests=4))
    scheduler = Scheduler(engine)
    scheduler.add_request("short", [1, 2, 3], SamplingParams(temperature=0, max_tokens=30))
    out: dict[str, list[int]] = {"short": [], "long": []}
    for o in scheduler.step():  # the short prompt's prefill: it is running from here on
        out[o.rid] += o.token_ids
    long_prompt = list(range(5, 45))
    scheduler.add_request("long", long_prompt, SamplingParams(temperature=0, max_tokens=2))
    while scheduler.has_work():
        for o in scheduler.step():
            out[o.rid] += o.token_ids
    assert out == {"short": _expected([1, 2, 3], 30), "long": _expected(long_prompt, 2)}
    kinds = "".join("d" if b.is_decode else "p" for b in engine.batches)
    # the short prompt, then the long one's five chunks of 8, each but the last followed by a decode step
    assert kinds.startswith("p" + "pd" * 4 + "p"), kinds
    assert [b.num_tokens for b in engine.batches if not b.is_decode] == [3] + [8] * 5


def test_retraction_keeps_every_output():
    prompts = [[i + 1] * 10 for i in range(4)]
    roomy, _ = _run(FakeEngine(400, _config(max_running_requests=4)), prompts, 20)
    # 4 prompts of 10 tokens growing to 30 need 120 slots; 60 forces retractions.
    tight, scheduler = _run(FakeEngine(60, _config(max_running_requests=4)), prompts, 20)
    assert roomy == tight == {f"r{i}": _expected(p, 20) for i, p in enumerate(prompts)}
    assert scheduler.stats().extra.get("retractions", 0) > 0


def test_running_requests_are_capped():
    engine = FakeEngine(400, _config(max_running_requests=2))
    _run(engine, [[1, 2], [3, 4], [5, 6]], 4)
    assert max(b.batch_size for b in engine.batches if b.is_decode) == 2
