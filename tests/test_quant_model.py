"""Whole models quantized at load time against transformers running the weights our quantized layers really hold:
each quantized layer's weight is dequantized, written back under its HF names as a safetensors checkpoint, and
loaded in transformers. Any mistake in routing, fusing, slicing, packing or the kernels shows as a mismatch."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from checkpoints import build_checkpoint
from engine_util import engine_prefill_logits, hf_model, random_prompts, teacher_forced_greedy
from safetensors.torch import save_file

from minisgl import LLM, SamplingParams
from minisgl.layers.linear import Linear, LMHead
from minisgl.models.weights import iter_safetensors

PROMPTS = random_prompts(n=4, hi=80, seed=5)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def dequantized_checkpoint(llm: LLM, src: str, dst: str) -> str:
    """A copy of checkpoint `src` in `dst` whose projection weights are those of llm's quantized layers (tp=1),
    the LM head untied when the model quantized its own copy of it."""
    model = llm.scheduler.engine.model
    modules = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    head_quantized = False  # and tied in the source
    for name, tensor in iter_safetensors(src):
        path, shard = model.route_weight(name)
        module = modules[path]
        if isinstance(module, Linear) and module.method is not None and name.endswith("weight"):
            start = sum(module.shards[:shard])
            tensor = module.method.dequantize(module)[start : start + module.shards[shard]]
        elif isinstance(module, LMHead) and module.method is not None:
            tensor = module.method.dequantize(module.proj)[: module.vocab_size]
        tensors[name] = tensor.float().cpu().contiguous()
    for module in modules.values():
        if isinstance(module, LMHead) and module.method is not None and module.tied is not None:
            head_quantized = True  # a tied head quantized its own copy of the embedding
            tensors["lm_head.weight"] = module.method.dequantize(module.proj)[: module.vocab_size].cpu().contiguous()
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    if head_quantized:
        with open(os.path.join(dst, "config.json")) as f:
            cfg = json.load(f)
        cfg["tie_word_embeddings"] = False
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f)
    return dst


def quantized_layers(llm: LLM) -> list[str]:
    return [p for p, m in llm.scheduler.engine.model.named_modules() if isinstance(m, Linear) and m.method is not None]


@pytest.mark.parametrize(
    "arch,scheme,head",
    [
        ("llama3", "int4", True),  # tied embeddings: the head gets its own quantized copy
        ("qwen2", "int8", True),  # q/k/v bias
        ("qwen3_moe", "int4", False),  # experts stay dense; attention is quantized
        ("gpt_neox", "int8", False),  # biases everywhere, interleaved fused qkv
        ("gpt_neox", "int4", True),
    ],
)
def test_quantized_model_matches_transformers_on_dequantized_weights(arch, scheme, head, tmp_path):
    src = build_checkpoint(str(tmp_path / "src"), arch)
    # float32 activations: the kernels are then exact to float32 rounding, so greedy tokens must agree exactly.
    llm = LLM(src, device="cpu", dtype="float32", quantization=scheme, quantize_lm_head=head, page_size=4)
    layers = quantized_layers(llm)
    assert layers and any("proj" in p or "dense" in p or "query_key_value" in p for p in layers)
    heads = [m for m in llm.scheduler.engine.model.modules() if isinstance(m, LMHead)]
    assert [m.method is not None for m in heads] == [head]
    hf = hf_model(dequantized_checkpoint(llm, src, str(tmp_path / "deq")))
    original = hf_model(src)
    for prompt in PROMPTS[:2]:
        ours, _ = engine_prefill_logits(llm, prompt)
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref, orig = hf(ids).logits[0], original(ids).logits[0]
        torch.testing.assert_close(ours, ref, rtol=1e-3, atol=2e-3)
        assert (orig - ref).abs().max() > 1e-2  # the weights really were quantized
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, GREEDY)):
        assert out.token_ids == teacher_forced_greedy(hf, prompt, out.token_ids)


@pytest.mark.parametrize(
    "device,scheme,dtype",
    [
        ("cpu", "int4", "bfloat16"),
        ("cpu", "int4", "auto"),
        ("cpu", "int8", "auto"),
        pytest.param("cuda", "int4", "bfloat16", marks=pytest.mark.gpu),
        pytest.param("cuda", "int8", "bfloat16", marks=pytest.mark.gpu),
        pytest.param("cuda", "fp8", "bfloat16", marks=pytest.mark.gpu),
    ],
)
def test_quantized_greedy_within_reference_top2(device, scheme, dtype, tmp_path):
    """bfloat16 activations (on CUDA the Triton kernels, CUDA graphs, and for fp8 per-token activation scales in
    prefill), or the CPU's auto dtype, whose int4 and int8 matmuls round activations to int8. Each greedy token
    must be one the reference ranks first or second, with a logit within bf16 (fp8: activation-quantization)
    noise of the best."""
    if scheme == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no fp8 tensor cores")
    src = build_checkpoint(str(tmp_path / "src"), "llama")
    llm = LLM(src, device=device, dtype=dtype, quantization=scheme, quantize_lm_head=True)
    assert llm.scheduler.engine.quant.int8_activations == (dtype == "auto")
    noise = 0.15 if scheme == "fp8" else 0.05
    hf = hf_model(dequantized_checkpoint(llm, src, str(tmp_path / "deq")))
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, GREEDY)):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1]
        for step, token in enumerate(out.token_ids):
            top2 = logits[step].topk(2)
            if scheme != "fp8":  # fp8 activations move near-tied logits past each other: only the gap holds
                assert token in top2.indices.tolist()
            assert top2.values[0] - logits[step, token] <= noise * (top2.values[0].abs() + 1)


def test_quantization_none_is_the_dense_path(tmp_path):
    src = build_checkpoint(str(tmp_path / "src"), "llama")
    llm = LLM(src, device="cpu", dtype="float32", quantization="none")
    assert not quantized_layers(llm)
    assert all(
        isinstance(m.weight, torch.nn.Parameter) for m in llm.scheduler.engine.model.modules() if isinstance(m, Linear)
    )
