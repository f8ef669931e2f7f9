"""A KV cache narrower than the activations (--kv-cache-dtype; fp16 under fp32 activations, as llama.cpp keeps its
cache): the engine against transformers whose cache rounds k and v the same way, and the choice `auto` makes."""

from __future__ import annotations

import pytest
import torch
from checkpoints import build_checkpoint
from engine_util import hf_model, random_prompts
from transformers import cache_utils

from minisgl import LLM, SamplingParams
from minisgl.engine.engine import resolve_kv_cache_dtype
from minisgl.kernels import native
from minisgl.server.args import parse_args

PROMPTS = random_prompts(n=8, hi=120, seed=5)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = build_checkpoint(str(tmp_path_factory.mktemp("llama3")), "llama3")
    return path, hf_model(path)


@pytest.fixture
def hf_fp16_cache(monkeypatch):
    """transformers with its k and v rounded to fp16 where they enter the cache: attention then reads what an fp16
    KV cache holds, for the new tokens too."""
    update = cache_utils.Cache.update

    def rounded(self, key_states, value_states, *args, **kwargs):
        def fp16(x):
            return x.to(torch.float16).to(x.dtype)

        return update(self, fp16(key_states), fp16(value_states), *args, **kwargs)

    monkeypatch.setattr(cache_utils.Cache, "update", rounded)


@torch.no_grad()
def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids]), use_cache=True).logits[0]


def check(llm: LLM, hf, prompts=PROMPTS) -> None:
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=True))
    for prompt, out in zip(prompts, outs):
        ref = hf_logits(hf, prompt + out.token_ids)[len(prompt) - 1 : -1].log_softmax(-1)
        assert out.token_ids == ref.argmax(-1).tolist(), f"prompt of {len(prompt)} tokens"
        got = torch.tensor(out.logprobs)
        want = ref.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        assert (got - want).abs().max() <= 5e-5


@pytest.mark.parametrize(
    "engine_kwargs",
    [{}, {"chunked_prefill_size": 32, "page_size": 4}, {"disable_radix_cache": True}],
    ids=["defaults", "chunked32-page4", "no-radix"],
)
def test_fp16_cache_matches_transformers_rounding_the_same(ckpt, hf_fp16_cache, engine_kwargs):
    path, hf = ckpt
    llm = LLM(path, device="cpu", dtype="float32", kv_cache_dtype="float16", **engine_kwargs)
    assert llm.scheduler.engine.pool.dtype == torch.float16
    check(llm, hf)
    # again, now every prompt comes from the prefix cache (whose k/v were rounded once, when stored)
    check(llm, hf)


def test_fp16_cache_on_the_torch_path(ckpt, hf_fp16_cache, monkeypatch):
    monkeypatch.setattr(native, "_lib", lambda: None)  # no native kernels: the torch attention backend
    path, hf = ckpt
    llm = LLM(path, device="cpu", dtype="float32", kv_cache_dtype="float16", page_size=4)
    assert type(llm.scheduler.engine.attn_backend).__name__ == "TorchBackend"
    check(llm, hf)


def test_the_rounding_is_really_there(ckpt):
    """Against transformers without the rounding, the fp16 cache's logprobs are measurably off: the checks above
    can fail."""
    path, hf = ckpt
    llm = LLM(path, device="cpu", dtype="float32", kv_cache_dtype="float16")
    with pytest.raises(AssertionError):
        check(llm, hf)


def test_auto_is_fp16_only_where_llama_cpp_numerics_run(ckpt):
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_kv_cache_dtype("auto", f32, cpu, llama_numerics=True)[0] == f16
    assert resolve_kv_cache_dtype("auto", bf16, cpu, llama_numerics=True)[0] == bf16  # already 16 bits
    assert resolve_kv_cache_dtype("auto", f32, cpu, llama_numerics=False)[0] == f32  # a named --dtype: exact
    assert resolve_kv_cache_dtype("auto", bf16, cuda, llama_numerics=False)[0] == bf16
    assert resolve_kv_cache_dtype("fp16", f32, cpu, llama_numerics=False)[0] == f16
    assert resolve_kv_cache_dtype("bfloat16", bf16, cuda, llama_numerics=False)[0] == bf16
    with pytest.raises(ValueError, match="only on the CPU"):
        resolve_kv_cache_dtype("float16", bf16, cuda, llama_numerics=False)
    with pytest.raises(ValueError, match="unknown kv_cache_dtype"):
        resolve_kv_cache_dtype("fp8_e5m2", f32, cpu, llama_numerics=False)
    # the engine applies it: a named --dtype keeps the cache in that dtype, int4 weights or not
    path, _ = ckpt
    llm = LLM(path, device="cpu", dtype="float32", quantization="int4")
    assert llm.scheduler.engine.pool.dtype == f32


def test_auto_picks_fp16_at_the_avx2_level(ckpt, monkeypatch):
    if native.cpu_level() == "none":
        pytest.skip("no native kernels: --dtype auto is fp32 and llama.cpp numerics still apply")
    monkeypatch.setenv("MINISGL_CPU_ISA", "avx2")  # no native bf16 at this level: fp32 activations
    native._lib.cache_clear()
    try:
        path, _ = ckpt
        engine = LLM(path, device="cpu", quantization="int4").scheduler.engine
        assert engine.dtype == torch.float32 and engine.pool.dtype == torch.float16
        assert engine.cpu_runner is not None  # the one-call decoder layer reads fp16 caches too
    finally:
        monkeypatch.undo()
        native._lib.cache_clear()


def test_backends_that_read_only_their_own_dtype_refuse_another_cache():
    from minisgl.attention import create_backend
    from minisgl.kvcache.pool import KVPool

    pool = KVPool(2, 4, 4, 3, 64, torch.float16, "cpu")
    assert create_backend("torch", pool, 9, 3, 64, 0.125, torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="needs the KV cache in the activations' dtype"):
        create_backend("triton", pool, 9, 3, 64, 0.125, torch.float32)


def test_server_flag():
    assert parse_args(["--kv-cache-dtype", "fp16"]).engine_kwargs()["kv_cache_dtype"] == "fp16"
    with pytest.raises(SystemExit):
        parse_args(["--kv-cache-dtype", "int3"])
