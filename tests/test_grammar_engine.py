"""Constrained decoding in the engine, on a tiny random checkpoint: the grammar mask is applied exactly.

The reference is independent of the code under test: transformers' logits on the same weights, and a separate
xgrammar matcher driven by the test. A constrained greedy token must be the argmax, over the tokens that
matcher allows, of transformers' unconstrained logits; this must hold with retraction and with the prefix cache.
"""

from __future__ import annotations

import re

import pytest
import torch
from checkpoints import build_checkpoint
from engine_util import hf_model, random_prompts

from minisgl import LLM, SamplingParams

REGEX = r"[a-z ]{3,24}\."
PROMPTS = random_prompts(n=12, hi=300, seed=5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = build_checkpoint(str(tmp_path_factory.mktemp("grammar-llama")), "llama")
    from transformers import AutoTokenizer

    return path, hf_model(path), AutoTokenizer.from_pretrained(path)


def reference_matcher(tokenizer, vocab: int, grammar: str):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[0])
    return xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_regex(grammar)), xgr


@torch.no_grad()
def check_masked_greedy(hf, tokenizer, prompt: list[int], out, regex: str = REGEX) -> None:
    """Every generated token is the allowed argmax of transformers' logits; the text matches the regex."""
    tokens = out.token_ids
    vocab = hf.config.vocab_size
    matcher, xgr = reference_matcher(tokenizer, vocab, regex)
    logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 :].float()
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    for i, tok in enumerate(tokens):
        matcher.fill_next_token_bitmask(bitmask, 0)
        allowed = torch.tensor([(int(bitmask[0, t // 32]) >> (t % 32)) & 1 for t in range(vocab)], dtype=torch.bool)
        assert allowed[tok], f"step {i}: token {tok} is not allowed by the grammar"
        expected = int(logits[i].masked_fill(~allowed, float("-inf")).argmax())
        assert tok == expected, f"step {i}: got {tok}, the allowed argmax is {expected}"
        assert matcher.accept_token(tok)
    if out.finish_reason == "stop":
        assert matcher.is_terminated() or matcher.is_completed()  # llguidance stops without the EOS
        assert re.fullmatch(regex, tokenizer.decode(tokens, skip_special_tokens=True))


GREEDY = SamplingParams(temperature=0, max_tokens=40, regex=REGEX)


# "cpu-thread": the CPU, with the grammar work on the grammar queue's thread as on a GPU
DEVICES = ["cpu", "cpu-thread", pytest.param("cuda", marks=pytest.mark.gpu)]


def make_llm(path: str, device: str, **kwargs) -> LLM:
    llm = LLM(path, device=device.removesuffix("-thread"), dtype="float32", **kwargs)
    if device == "cpu-thread":
        llm.scheduler.grammar_overlap = True
    assert llm.scheduler.grammar_overlap == (device != "cpu")
    return llm


@pytest.mark.parametrize("device", DEVICES)
def test_constrained_greedy_is_the_allowed_argmax(ckpt, device):
    path, hf, tok = ckpt
    llm = make_llm(path, device, page_size=4)
    outs = llm.generate(PROMPTS[:6], GREEDY)
    for p, o in zip(PROMPTS[:6], outs):
        check_masked_greedy(hf, tok, p, o)
    assert sum(o.finish_reason == "stop" for o in outs) >= 1  # a finished grammar ends the request


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
def test_requests_ending_while_the_grammar_thread_advances(ckpt, device):
    """Reading a step's tokens ends requests by length (giving their rows away, row -1) while the grammar thread
    is still advancing their matchers: it must work from the rows they had when the advance began, never look
    them up as it goes (with the slow advance here, the requests end and free their rows before it starts)."""
    import time

    path, hf, tok = ckpt
    llm = make_llm(path, device)
    queue = llm.scheduler.grammars
    advance = queue._advance

    def slow_advance(*args):
        time.sleep(0.02)  # let the scheduler's thread finish the requests first
        return advance(*args)

    queue._advance = slow_advance
    params = [SamplingParams(temperature=0, max_tokens=k, regex=REGEX) for k in range(2, 8)]
    outs = llm.generate(PROMPTS[:6], params)
    for p, o, k in zip(PROMPTS[:6], outs, range(2, 8)):
        assert o.finish_reason == "length" and len(o.token_ids) == k
        check_masked_greedy(hf, tok, p, o)


def test_constrained_exact_with_retraction(ckpt):
    path, hf, tok = ckpt
    # 340 tokens cannot hold 12 prompts of up to 300 tokens plus outputs of 20 or more at once: requests get
    # retracted.
    regex = r"[a-z ]{20,60}\."
    llm = LLM(path, device="cpu", dtype="float32", max_total_tokens=340, page_size=4, chunked_prefill_size=64)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40, regex=regex))
    assert llm.scheduler.stats().extra.get("retractions", 0) > 0
    for p, o in zip(PROMPTS, outs):
        check_masked_greedy(hf, tok, p, o, regex)


def test_constrained_exact_with_prefix_cache(ckpt):
    path, hf, tok = ckpt
    llm = LLM(path, device="cpu", dtype="float32", page_size=2)
    first = llm.generate(PROMPTS[:4], GREEDY)
    before = llm.scheduler.stats().extra.get("cached_tokens", 0)
    second = llm.generate(PROMPTS[:4], GREEDY)
    assert llm.scheduler.stats().extra["cached_tokens"] - before >= sum(len(p) - 2 for p in PROMPTS[:4])
    assert [o.token_ids for o in first] == [o.token_ids for o in second]
    for p, o in zip(PROMPTS[:4], second):
        check_masked_greedy(hf, tok, p, o)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_sampling_n_and_logprobs(ckpt, device):
    """Constrained and unconstrained requests share a batch without changing each other's tokens; every
    sample of n > 1 follows its own matcher; logprobs are the model's own (finite) values."""
    path, _, tok = ckpt
    llm = make_llm(path, device)
    free = SamplingParams(temperature=1.0, seed=11, max_tokens=20)
    alone = llm.generate(PROMPTS[:3], free)
    constrained = SamplingParams(
        temperature=1.0, seed=12, max_tokens=40, n=3, regex=REGEX, logprobs=True, top_logprobs=3
    )
    mixed = llm.generate(PROMPTS[:6], [free] * 3 + [constrained] * 3)
    assert [o.token_ids for o in alone] == [o.token_ids for o in mixed[:3]]
    finished = 0
    for o in mixed[3:]:
        assert len(o.outputs) == 3
        for c in o.outputs:
            assert len(c.logprobs) == len(c.token_ids) and all(x > float("-inf") for x in c.logprobs)
            text = tok.decode(c.token_ids, skip_special_tokens=True)
            if c.finish_reason == "stop":
                finished += 1
                assert re.fullmatch(REGEX, text), text
            else:
                assert re.fullmatch(r"[a-z ]*\.?", text), text  # a prefix of the language
    assert finished >= 1


def test_bad_grammar_raises_before_running(ckpt):
    llm = LLM(ckpt[0], device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="regex"):
        llm.generate([PROMPTS[0]], SamplingParams(regex="(((", max_tokens=4))
    with pytest.raises(ValueError, match="at most one"):
        llm.generate([PROMPTS[0]], SamplingParams(regex="a", ebnf='root ::= "a"', max_tokens=4))
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8, ebnf='root ::= "ab" | "cd"'))
    assert out[0].finish_reason == "stop"


@pytest.mark.parametrize("backend", ["llguidance"])
def test_other_backend_is_a_drop_in(ckpt, backend):
    pytest.importorskip(backend)
    path, hf, tok = ckpt
    llm = LLM(path, device="cpu", dtype="float32", grammar_backend=backend)
    outs = llm.generate(PROMPTS[:3], GREEDY)
    for p, o in zip(PROMPTS[:3], outs):
        check_masked_greedy(hf, tok, p, o)


@pytest.mark.parametrize("library", ["xgrammar", "torch"])
def test_apply_token_mask_matches_the_bits(monkeypatch, library):
    """Both paths of apply_token_mask (xgrammar's kernel, plain torch ops) mask exactly the cleared bits of
    the constrained rows, including the ids past the last full word, and leave other rows alone."""
    from minisgl.engine.sampling import TokenMask, apply_token_mask

    if library == "torch":
        monkeypatch.setitem(__import__("sys").modules, "xgrammar", None)  # import fails: the torch fallback
    g = torch.Generator().manual_seed(0)
    v = 100  # not a multiple of 32
    logits = torch.randn(5, v, generator=g)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, 4), generator=g, dtype=torch.int64).to(torch.int32)
    mask = TokenMask(bitmask, torch.tensor([3, 1]), [3, 1])
    for inplace in (False, True):
        src = logits.clone()
        out = apply_token_mask(src, mask, inplace=inplace)
        assert (out is src) == inplace and (inplace or torch.equal(src, logits))
        for b in range(5):
            for t in range(v):
                if b in (1, 3):
                    allowed = (int(bitmask[b, t // 32]) >> (t % 32)) & 1
                    assert (out[b, t] == logits[b, t]) if allowed else out[b, t] == float("-inf")
                else:
                    assert out[b, t] == logits[b, t]


def test_stop_strings_cut_constrained_output(ckpt):
    path, _, tok = ckpt
    llm = LLM(path, device="cpu", dtype="float32")
    full = llm.generate([PROMPTS[1]], GREEDY)[0]
    text = tok.decode(full.token_ids, skip_special_tokens=True)
    assert len(text) >= 4
    stop = text[2:4]
    cut = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=40, regex=REGEX, stop=[stop]))[0]
    assert cut.text == text[: text.find(stop)] and cut.finish_reason == "stop"


@pytest.mark.parametrize("backend", ["xgrammar", "llguidance"])
def test_batched_advance_matches_one_by_one(ckpt, backend):
    """`advance` (xgrammar spreads a large batch over threads) leaves every matcher where accepting its own
    tokens one at a time does, reports each row's verdict in its own place (rejected tokens included), fills
    exactly the rows of matchers that accepted and go on, with the mask one-by-one filling gives, and
    `terminated` agrees with the library's own matcher once the stop token is taken."""
    import random

    pytest.importorskip(backend)
    from minisgl.grammar import GrammarSpec, bitmask_width, create_backend

    _, hf, tok = ckpt
    vocab, stop = hf.config.vocab_size, 0
    b = create_backend(backend, tok, vocab, [stop])
    b._threads = 4  # xgrammar: more slices than this machine may have cores (the pool queues them)
    compiled = b.compile(GrammarSpec("regex", REGEX))
    batched, single = [b.matcher(compiled) for _ in range(40)], [b.matcher(compiled) for _ in range(40)]
    library_says_done = (lambda m: m._m.is_terminated()) if backend == "xgrammar" else (lambda m: m._m.is_stopped())
    rng = random.Random(0)
    rejected = 0
    for step in range(30):
        live = [i for i in range(40) if not single[i].terminated]
        if not live:
            break
        masks = torch.empty(40, bitmask_width(vocab), dtype=torch.int32)
        b.fill_masks([single[i] for i in live], masks, live)
        tokens = []
        for row in live:
            allowed = [t for t in range(vocab) if (int(masks[row, t // 32]) >> (t % 32)) & 1]
            if row % 7 == step % 7:
                tokens.append(rng.randrange(vocab))  # mostly rejected
            else:
                tokens.append(stop if stop in allowed and rng.random() < 0.5 else rng.choice(allowed))
        expected = [single[i].accept(t) for i, t in zip(live, tokens)]
        got = torch.full((40, bitmask_width(vocab)), -7, dtype=torch.int32)  # -7: not written
        assert b.advance([batched[i] for i in live], tokens, got, live) == expected
        rejected += expected.count(False)
        for i in live:
            assert batched[i].terminated == single[i].terminated == library_says_done(batched[i]), f"row {i}"
        filled = [i for i, a in zip(live, expected) if a and not single[i].terminated]
        after = torch.empty(40, bitmask_width(vocab), dtype=torch.int32)
        b.fill_masks([single[i] for i in filled], after, filled)
        assert torch.equal(got[filled], after[filled]), f"step {step}: the matchers diverged"
        untouched = [i for i in range(40) if i not in filled]
        assert (got[untouched] == -7).all(), f"step {step}: advance wrote a row it should not have"
    assert rejected and sum(m.terminated for m in single) >= 10
