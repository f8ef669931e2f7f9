"""The offline API's promises beyond plain greedy parity: loading forms, dtypes, sampling options, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from checkpoints import build_checkpoint
from engine_util import hf_model, random_prompts

from minisgl import LLM, SamplingParams

PROMPTS = random_prompts(n=6, hi=120, seed=3)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = build_checkpoint(str(tmp_path_factory.mktemp("llama")), "llama")
    return path, hf_model(path)


@pytest.fixture(scope="module")
def llm(llama):
    return LLM(llama[0], device="cpu", dtype="float32", page_size=4)


@torch.no_grad()
def hf_logprobs(hf, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """transformers' log-softmax at each generation step, given the tokens actually generated."""
    logits = hf(torch.tensor([prompt + generated])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)], dim=-1)


@pytest.mark.slow
def test_sharded_checkpoint_from_hub_cache(llama, tmp_path):
    """A repo id resolves through huggingface_hub's cache (HF_HOME, HF_HUB_OFFLINE) to a sharded checkpoint."""
    path, hf = llama
    snapshot = tmp_path / "hf" / "hub" / "models--tiny--llama" / "snapshots" / "0123abcd"
    hf.save_pretrained(snapshot, safe_serialization=True, max_shard_size="60KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(path, name), snapshot)
    assert (snapshot / "model.safetensors.index.json").exists()
    assert len(list(snapshot.glob("*.safetensors"))) > 2
    (tmp_path / "hf" / "hub" / "models--tiny--llama" / "refs").mkdir()
    (tmp_path / "hf" / "hub" / "models--tiny--llama" / "refs" / "main").write_text("0123abcd")

    code = (
        "import json, sys\n"
        "from minisgl import LLM, SamplingParams\n"
        "llm = LLM('tiny/llama', device='cpu', dtype='float32')\n"
        "outs = llm.generate(json.loads(sys.argv[1]), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))\n"
        "print(json.dumps([o.token_ids for o in outs]))\n"
    )
    # A fresh process: huggingface_hub reads HF_HOME when it is imported.
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(PROMPTS[:3])], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    from_hub = json.loads(proc.stdout.strip().splitlines()[-1])
    local = LLM(path, device="cpu", dtype="float32").generate(
        PROMPTS[:3], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    )
    assert from_hub == [o.token_ids for o in local]


def test_unknown_repo_id_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="neither a local path nor a downloadable"):
        LLM("no-such-org/no-such-model", device="cpu")


def test_unsupported_architecture_lists_supported(llama, tmp_path):
    shutil.copytree(llama[0], tmp_path / "ckpt")
    cfg_path = tmp_path / "ckpt" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="FancyNewForCausalLM.*LlamaForCausalLM.*Qwen3MoeForCausalLM"):
        LLM(str(tmp_path / "ckpt"), device="cpu")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_dtypes_track_float32(llama, dtype):
    from engine_util import engine_prefill_logits

    half = LLM(llama[0], device="cpu", dtype=dtype)
    assert half.scheduler.engine.dtype == getattr(torch, dtype)
    ours, _ = engine_prefill_logits(half, PROMPTS[1])
    ref, _ = engine_prefill_logits(LLM(llama[0], device="cpu", dtype="float32"), PROMPTS[1])
    assert (ours - ref).abs().max().item() < 0.1 * ref.abs().max().item()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9


def test_dummy_weights_from_config_alone(llama, tmp_path):
    os.makedirs(tmp_path / "cfg")
    shutil.copy(os.path.join(llama[0], "config.json"), tmp_path / "cfg")
    llm = LLM(str(tmp_path / "cfg"), device="cpu", load_format="dummy", skip_tokenizer_init=True)
    outs = llm.generate(PROMPTS[:2], SamplingParams(temperature=0.7, max_tokens=5, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [5, 5]
    with pytest.raises(FileNotFoundError):  # a dummy model still needs its config
        LLM(str(tmp_path / "missing"), device="cpu", load_format="dummy")


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], seeded)[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=7, ignore_eos=True)
    batch = llm.generate(PROMPTS[1:4] + [PROMPTS[0]], [others] * 3 + [seeded])
    assert batch[-1].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=4321, ignore_eos=True)
    assert llm.generate([PROMPTS[0]], other_seed)[0].token_ids != alone


def test_n_samples_share_the_prompt_kv(llm):
    prompt = random_prompts(n=2, lo=200, hi=200, seed=9)[1]
    before = llm.scheduler.stats().extra.get("cached_tokens", 0)
    params = SamplingParams(temperature=1.0, max_tokens=10, n=4, seed=7, ignore_eos=True)
    out = llm.generate([prompt], params)[0]
    cached = llm.scheduler.stats().extra.get("cached_tokens", 0) - before
    assert cached >= 3 * (len(prompt) - 4)  # samples 2..4 reused the first sample's prompt pages
    assert len(out.outputs) == 4 and all(len(c.token_ids) == 10 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different samples, not copies
    again = llm.generate([prompt], params)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    llm.scheduler.kv.check_no_leaks()


def test_logprobs_match_transformers(llama, llm):
    hf = llama[1]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=True, top_logprobs=5, ignore_eos=True)
    for prompt, out in zip(PROMPTS[:3], llm.generate(PROMPTS[:3], params)):
        ref = hf_logprobs(hf, prompt, out.token_ids)
        chosen = ref.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(out.logprobs), chosen, atol=1e-4)
        ref_top_lp, ref_top_ids = ref.topk(5, dim=-1)
        for step, alts in enumerate(out.outputs[0].top_logprobs):
            assert [a for a, _ in alts] == ref_top_ids[step].tolist()
            assert torch.allclose(torch.tensor([b for _, b in alts]), ref_top_lp[step], atol=1e-4)


def test_penalties_follow_transformers_and_openai_formulas(llama, llm):
    """Greedy with penalties equals a step-by-step reference: HF's repetition-penalty processor, then
    OpenAI's frequency/presence formula over the generated tokens."""
    from transformers import RepetitionPenaltyLogitsProcessor

    hf = llama[1]
    params = SamplingParams(
        temperature=0,
        max_tokens=8,
        repetition_penalty=1.3,
        frequency_penalty=0.5,
        presence_penalty=0.4,
        ignore_eos=True,
    )
    prompt = PROMPTS[2]
    out = llm.generate([prompt], params)[0].token_ids
    rep = RepetitionPenaltyLogitsProcessor(1.3)
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(8):
            ids = torch.tensor([prompt + generated])
            logits = rep(ids, hf(ids).logits[:, -1].float())[0]
            for tok in set(generated):
                logits[tok] -= 0.5 * generated.count(tok) + 0.4
            generated.append(int(logits.argmax()))
    assert out == generated


def test_stop_tokens_eos_and_length(llama, tmp_path):
    path = str(tmp_path / "ckpt")
    shutil.copytree(llama[0], path)
    free = LLM(path, device="cpu", dtype="float32").generate(
        [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    )[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    target = free.token_ids[4]
    cut = free.token_ids.index(target) + 1

    stopped = LLM(path, device="cpu", dtype="float32").generate(
        [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[target], ignore_eos=True)
    )[0]
    assert stopped.token_ids == free.token_ids[:cut] and stopped.finish_reason == "stop"

    # EOS comes from generation_config.json when there is one (chat models stop on it), else config.json.
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [target]}, f)
    llm = LLM(path, device="cpu", dtype="float32")
    eos = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10))[0]
    assert eos.token_ids == free.token_ids[:cut] and eos.finish_reason == "stop"
    ignored = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert ignored.token_ids == free.token_ids


def test_stop_strings_cut_the_text(llm):
    free = llm.generate(["Paris is the capital"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    text = free.text
    assert len(text) > 4
    stop = text[2:4]
    out = llm.generate(
        ["Paris is the capital"], SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True)
    )[0]
    assert out.text == text[: text.find(stop)] and out.finish_reason == "stop"


def test_prompts_that_cannot_run_are_rejected(llama):
    llm = LLM(llama[0], device="cpu", dtype="float32", max_total_tokens=64, page_size=4)
    with pytest.raises(ValueError, match="does not fit in the KV pool"):
        llm.generate([list(range(3, 103))], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="context length is 1024"):
        llm.generate([[5] * 1024], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="outside|must be in"):
        llm.generate([[5, 100000]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="top_p"):
        llm.generate([[5, 6]], SamplingParams(top_p=0.0))
    # The engine is still usable afterwards and nothing leaked.
    assert len(llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3))[0].token_ids) == 3
    llm.scheduler.kv.check_no_leaks()


def test_default_cpu_pool_is_llama_cpp_default_context(llama):
    """On the CPU the prefix cache soon makes the whole pool resident, so without --max-total-tokens the pool
    holds 4096 tokens (llama.cpp's default -c), not gigabytes; requests of that length still run."""
    llm = LLM(llama[0], device="cpu", dtype="float32", page_size=4)
    engine = llm.scheduler.engine
    assert (engine.pool.num_pages - 1) * engine.page_size == 4096
    out = llm.generate([[5] * 1000] * 3, SamplingParams(max_tokens=24, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [24] * 3


def test_cpu_pages_default_to_16_tokens(llama):
    """On the CPU a page holds 16 tokens unless asked otherwise: a sequence's KV rows then stay in contiguous runs
    however scattered the freed pages of earlier requests come back (one-token pages let decode attention slow
    down as a server runs)."""
    llm = LLM(llama[0], device="cpu", dtype="float32")
    assert llm.scheduler.engine.page_size == 16 and llm.scheduler.kv.page_size == 16
    out = llm.generate([[5] * 37, [6] * 3], SamplingParams(max_tokens=20, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [20, 20]
    llm.scheduler.kv.check_no_leaks()
    assert LLM(llama[0], device="cpu", dtype="float32", page_size=1).scheduler.engine.page_size == 1
