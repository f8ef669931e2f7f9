"""CPU decode with one native call per decoder layer (engine/cpu_runner.py) against the module path on the
same int4 model: the same logits at every decode step, to rounding, at every ISA level the CPU runs."""

from __future__ import annotations

import pytest
import torch
from checkpoints import build_checkpoint
from engine_util import random_prompts

from minisgl import LLM, SamplingParams
from minisgl.engine import cpu_runner
from minisgl.engine.engine import Engine
from minisgl.kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason="no native CPU kernels for this CPU or build")

PROMPTS = random_prompts(n=6, hi=60, seed=11)
STEPS = 8


def decode_logits(llm: LLM, prompts: list[list[int]], monkeypatch) -> list[torch.Tensor]:
    """The logits of each decode step while generating STEPS greedy tokens per prompt."""
    seen: list[torch.Tensor] = []
    forward = Engine.forward

    def recording(self, batch):
        out = forward(self, batch)
        if batch.is_decode:
            seen.append(out.clone())
        return out

    monkeypatch.setattr(Engine, "forward", recording)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True))
    monkeypatch.setattr(Engine, "forward", forward)
    return seen


@pytest.fixture(scope="module", params=["bfloat16", "auto", "float32-kv-fp16"])
def int4_llama(tmp_path_factory, request):
    """bfloat16: fp32 matmuls; auto: activations rounded to int8 for the int4 matmuls (QuantConfig);
    float32-kv-fp16: fp32 activations over an fp16 KV cache."""
    path = build_checkpoint(str(tmp_path_factory.mktemp("llama")), "llama3")
    dtype, _, kv = request.param.partition("-kv-")
    llm = LLM(path, device="cpu", dtype=dtype, quantization="int4", page_size=4, kv_cache_dtype=kv or "auto")
    assert llm.scheduler.engine.quant.int8_activations == (dtype == "auto")
    if kv:
        assert llm.scheduler.engine.pool.dtype == torch.float16
    return llm


@pytest.fixture(params=native.LEVELS)
def level(request, monkeypatch):
    if native.LEVELS.index(request.param) > native.LEVELS.index(native.cpu_level()):
        pytest.skip(f"this CPU has no {request.param}")
    monkeypatch.setenv("MINISGL_CPU_ISA", request.param)
    native._lib.cache_clear()
    yield request.param
    monkeypatch.undo()
    native._lib.cache_clear()


@pytest.mark.parametrize("batch", [1, 6])
def test_native_decoder_matches_module_path(int4_llama, batch, level, monkeypatch):
    engine = int4_llama.scheduler.engine
    runner = engine.cpu_runner
    assert runner is not None, "a bf16 int4 Llama qualifies"
    calls = []
    monkeypatch.setattr(runner, "run", lambda *a, run=runner.run: calls.append(1) or run(*a))
    ours = decode_logits(int4_llama, PROMPTS[:batch], monkeypatch)
    assert len(calls) == STEPS - 1  # the first token comes from prefill
    monkeypatch.setattr(engine, "cpu_runner", None)
    theirs = decode_logits(int4_llama, PROMPTS[:batch], monkeypatch)
    assert len(ours) == len(theirs) == STEPS - 1
    for step, (a, b) in enumerate(zip(ours, theirs)):
        # The two paths differ only in the order of the int4 matmul's sums, so at most a bf16 rounding flip
        # per value, compounding over the layers: far below the spread of the logits.
        assert (a - b).abs().max() <= 0.02 * b.abs().max(), f"step {step}"
        if not torch.equal(a.argmax(-1), b.argmax(-1)):
            break  # greedy took another token: later steps decode different sequences


def test_what_does_not_qualify_keeps_the_module_path(tmp_path):
    path = build_checkpoint(str(tmp_path / "llama"), "llama")
    dense = LLM(path, device="cpu", dtype="bfloat16", quantization="none")
    assert dense.scheduler.engine.cpu_runner is None
    qwen3 = build_checkpoint(str(tmp_path / "qwen3"), "qwen3")  # q/k norm
    assert LLM(qwen3, device="cpu", dtype="bfloat16", quantization="int4").scheduler.engine.cpu_runner is None


def test_large_batches_take_the_module_path(int4_llama, monkeypatch):
    runner = int4_llama.scheduler.engine.cpu_runner
    monkeypatch.setattr(cpu_runner, "MAX_BATCH", 2)
    calls = []
    monkeypatch.setattr(runner, "run", lambda *a, run=runner.run: calls.append(1) or run(*a))
    int4_llama.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert not calls
