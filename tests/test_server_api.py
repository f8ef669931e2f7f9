"""The OpenAI-compatible API of a real server process, through the official `openai` client (sync and async).

References are independent of the server: transformers on the same tiny checkpoint for tokens, text and
logprobs, and the tokenizer's own chat template for prompt token counts.
"""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest
import torch
from server_util import TINY_ARGS, chat_ids, hf_greedy, serve, tiny_checkpoint

pytestmark = pytest.mark.slow  # starts a server

NAME = "tiny"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a capital city."}]
PROMPT = "The quick brown fox"
N_TOKENS = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    yield from serve(tmp_path_factory, "server-api", ["--model", ckpt, *TINY_ARGS, "--served-model-name", NAME])


@pytest.fixture(scope="module")
def tok(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def hf(ckpt):
    from engine_util import hf_model

    return hf_model(ckpt)


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def greedy(extra: dict | None = None, **kw) -> dict:
    """Arguments of a greedy request for N_TOKENS tokens (EOS ignored: a random model may emit it anywhere)."""
    return dict(model=NAME, temperature=0, max_tokens=N_TOKENS, extra_body={"ignore_eos": True, **(extra or {})}, **kw)


# ---- chat ----------------------------------------------------------------------------------------------------
def test_models_lists_the_served_name(server, ckpt):
    models = server.client().models.list().data
    assert [m.id for m in models] == [NAME]
    assert models[0].object == "model"


def test_chat_greedy_matches_transformers_streamed_and_not(server, tok, hf):
    ids = chat_ids(tok, MESSAGES)
    ref_tokens, _ = hf_greedy(hf, ids, N_TOKENS)
    client = server.client()
    r = client.chat.completions.create(messages=MESSAGES, **greedy())
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == NAME
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == decode(tok, ref_tokens)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(ids),
        N_TOKENS,
        len(ids) + N_TOKENS,
    )

    chunks = list(
        client.chat.completions.create(
            messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **greedy()
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == N_TOKENS
    assert chunks[-1].usage.prompt_tokens == len(ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_content_parts_equal_plain_string(server):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "city."}]}]
    plain = [{"role": "user", "content": "Name a city."}]
    client = server.client()
    a = client.chat.completions.create(messages=parts, **greedy())
    b = client.chat.completions.create(messages=plain, **greedy())
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_chat_logprobs_match_transformers(server, tok, hf):
    ids = chat_ids(tok, MESSAGES)
    ref_tokens, ref_lps = hf_greedy(hf, ids, N_TOKENS)
    r = server.client().chat.completions.create(messages=MESSAGES, logprobs=True, top_logprobs=3, **greedy())
    content = r.choices[0].logprobs.content
    assert len(content) == N_TOKENS
    for tid, lp, item in zip(ref_tokens, ref_lps, content):
        assert item.token == tok.decode([tid])
        assert item.logprob == pytest.approx(lp[tid].item(), abs=1e-4)
        top_vals, top_ids = lp.topk(3)
        assert [t.token for t in item.top_logprobs] == [tok.decode([i]) for i in top_ids.tolist()]
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(top_vals.tolist(), abs=1e-4)
        assert item.bytes == list(item.token.encode())


def test_chat_n_and_seed(server):
    client = server.client()
    kw = dict(model=NAME, messages=MESSAGES, temperature=1.0, max_tokens=N_TOKENS, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(seed=7, n=3, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert a.usage.completion_tokens == 3 * N_TOKENS
    texts = [c.message.content for c in a.choices]
    assert len(set(texts)) > 1, "n samples at temperature 1 should differ"
    b = client.chat.completions.create(seed=7, n=3, **kw)
    assert [c.message.content for c in b.choices] == texts
    c = client.chat.completions.create(seed=8, n=3, **kw)
    assert [x.message.content for x in c.choices] != texts
    # streamed samples are the same samples
    chunks = list(client.chat.completions.create(seed=7, n=3, stream=True, **kw))
    streamed = [
        "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices and ch.choices[0].index == i)
        for i in range(3)
    ]
    assert streamed == texts


def test_chat_stop_string_cuts_before_it(server, tok, hf):
    client = server.client()
    full = client.chat.completions.create(messages=MESSAGES, **greedy()).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = full[: full.find(stop)]
    r = client.chat.completions.create(messages=MESSAGES, stop=[stop, "\x00never"], **greedy())
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(messages=MESSAGES, stop=stop, stream=True, **greedy()))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_chat_stop_token_ids(server, tok, hf):
    ids = chat_ids(tok, MESSAGES)
    ref_tokens, _ = hf_greedy(hf, ids, N_TOKENS)
    stop_id = ref_tokens[4]
    k = ref_tokens.index(stop_id)
    r = server.client().chat.completions.create(messages=MESSAGES, **greedy({"stop_token_ids": [stop_id]}))
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == k + 1  # the stop token is generated, counted, not shown
    assert r.choices[0].message.content == decode(tok, ref_tokens[:k])


def test_developer_role_is_the_system_prompt(server):
    """OpenAI's newer name for the system role renders as the system message does (same prompt, same answer)."""
    as_developer = [{**MESSAGES[0], "role": "developer"}, MESSAGES[1]]
    a = server.client().chat.completions.create(messages=MESSAGES, **greedy())
    b = server.client().chat.completions.create(messages=as_developer, **greedy())
    assert b.usage.prompt_tokens == a.usage.prompt_tokens
    assert b.choices[0].message.content == a.choices[0].message.content


def test_logit_bias_is_honoured(server, tok, hf):
    """OpenAI's logit_bias on both endpoints and SGLang's native one: +100 forces a token at every step, -100
    bans the greedy token, whose place goes to transformers' runner-up."""
    forced = 100
    r = server.client().chat.completions.create(messages=MESSAGES, **greedy(), logit_bias={str(forced): 100})
    assert r.choices[0].message.content == decode(tok, [forced] * N_TOKENS)
    r = server.client().completions.create(prompt=PROMPT, **greedy(), logit_bias={str(forced): 100})
    assert r.choices[0].text == decode(tok, [forced] * N_TOKENS)
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 3, "temperature": 0, "logit_bias": {"100": 100}}}
    assert server.post("/generate", body).json()["text"] == decode(tok, [forced] * 3)

    ids = chat_ids(tok, MESSAGES)
    ref_tokens, ref_lps = hf_greedy(hf, ids, 1)
    runner_up = int(ref_lps[0].topk(2).indices[1])
    ban = {str(ref_tokens[0]): -100}
    r = server.client().chat.completions.create(messages=MESSAGES, **{**greedy(), "max_tokens": 1}, logit_bias=ban)
    assert r.choices[0].message.content == decode(tok, [runner_up])


# ---- vLLM's and SGLang's extensions ----------------------------------------------------------------------------
@torch.no_grad()
def held_greedy(hf, prompt: list[int], n: int, ending: set[int], min_tokens: int) -> list[int]:
    """transformers' greedy tokens with the `ending` ids at -inf for the first min_tokens steps, up to n tokens
    or the first ending id (included)."""
    ids, out = list(prompt), []
    while len(out) < n and not (out and out[-1] in ending):
        logits = hf(torch.tensor([ids])).logits[0, -1].float()
        if len(out) < min_tokens:
            logits[list(ending)] = float("-inf")
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def test_min_tokens_holds_back_stop_tokens_and_strings(server, tok, hf):
    """vLLM's min_tokens (SGLang's min_new_tokens natively): no stop token before it, as transformers' greedy with
    that token masked; a stop string in the text before it does not end the output."""
    ids = chat_ids(tok, MESSAGES)
    ref, _ = hf_greedy(hf, ids, N_TOKENS)
    stop_id = ref[1]
    want = held_greedy(hf, ids, N_TOKENS, {stop_id}, 6)
    assert len(want) > ref.index(stop_id) + 1  # without min_tokens it would have ended sooner
    r = server.client().chat.completions.create(
        messages=MESSAGES, **greedy({"stop_token_ids": [stop_id], "min_tokens": 6})
    )
    assert r.usage.completion_tokens == len(want)
    assert r.choices[0].message.content == decode(tok, want[:-1] if want[-1] == stop_id else want)
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True,
                                                  "stop_token_ids": [stop_id], "min_new_tokens": 6}}  # fmt: skip
    assert server.post("/generate", body).json()["meta_info"]["completion_tokens"] == len(want)

    full = decode(tok, ref)
    early = decode(tok, ref[: N_TOKENS // 2])
    stop = next(early[i : i + 2] for i in range(len(early) - 1) if early[i : i + 2] not in decode(tok, ref[-2:]))
    r = server.client().completions.create(prompt=PROMPT, stop=[stop], **greedy({"min_tokens": N_TOKENS}))
    plain = server.client().completions.create(prompt=PROMPT, **greedy())
    assert r.choices[0].text == plain.choices[0].text and r.choices[0].finish_reason == "length"
    r = server.client().chat.completions.create(messages=MESSAGES, stop=[stop], **greedy({"min_tokens": N_TOKENS}))
    assert r.choices[0].message.content == full and r.choices[0].finish_reason == "length"


def test_stop_strings_and_tokens_kept_with_no_stop_trim(server, tok, hf):
    """SGLang's no_stop_trim and vLLM's include_stop_str_in_output keep the stop string or token that ended the
    output, streamed or not; the natively too."""
    client = server.client()
    full = client.chat.completions.create(messages=MESSAGES, **greedy()).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = full[: full.find(stop) + len(stop)]
    for name in ("no_stop_trim", "include_stop_str_in_output"):
        r = client.chat.completions.create(messages=MESSAGES, stop=stop, **greedy({name: True}))
        assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
        chunks = client.chat.completions.create(messages=MESSAGES, stop=stop, stream=True, **greedy({name: True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    ref, _ = hf_greedy(hf, chat_ids(tok, MESSAGES), N_TOKENS)
    stop_id = ref[4]
    k = ref.index(stop_id)
    extra = {"stop_token_ids": [stop_id], "no_stop_trim": True}
    r = client.chat.completions.create(messages=MESSAGES, **greedy(extra))
    assert r.choices[0].message.content == decode(tok, ref[: k + 1])
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True}}
    text = server.post("/generate", body).json()["text"]
    stop = text[3:5]
    body["sampling_params"] |= {"stop": stop, "no_stop_trim": True}
    assert server.post("/generate", body).json()["text"] == text[: text.find(stop) + 2]


def test_chat_template_options_render_as_transformers_does(server, tok, hf):
    """chat_template_kwargs reach the template as variables; continue_final_message (without the generation
    prompt) lets the model go on with the assistant's last message: same prompt and greedy tokens as
    transformers' apply_chat_template with those arguments."""
    continued = MESSAGES + [{"role": "assistant", "content": "The city"}]
    cases = [
        (MESSAGES, {"system_note": "Answer in one word."}, {}),
        (continued, {}, {"continue_final_message": True, "add_generation_prompt": False}),
    ]
    for messages, template_vars, flags in cases:
        ids = tok.apply_chat_template(
            messages,
            tokenize=True,
            add_generation_prompt=flags.get("add_generation_prompt", True),
            continue_final_message=flags.get("continue_final_message", False),
            **template_vars,
        )
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        extra = {**flags, **({"chat_template_kwargs": template_vars} if template_vars else {})}
        r = server.client().chat.completions.create(messages=messages, **greedy(extra))
        assert r.usage.prompt_tokens == len(ids)
        assert r.choices[0].message.content == decode(tok, hf_greedy(hf, ids, N_TOKENS)[0])


def test_continuous_usage_stats_on_every_chunk(server):
    """vLLM's stream_options.continuous_usage_stats: each chunk carries the usage so far, the last the whole."""
    whole = server.client().chat.completions.create(messages=MESSAGES, **greedy()).usage
    chunks = list(
        server.client().chat.completions.create(
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            **greedy(),
        )
    )
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and chunks[-1].usage == whole and 0 < counts[len(counts) // 2] < N_TOKENS


def test_bookkeeping_and_router_fields_change_nothing(server):
    """Fields that change nothing in the answer (OpenAI's bookkeeping, what sglang-router adds at SGLang's
    defaults) are accepted; the answer is the one without them."""
    extra = {"store": False, "metadata": {"k": "v"}, "service_tier": "auto", "user": "u", "prompt_cache_key": "p",
             "safety_identifier": "s", "no_stop_trim": False, "continue_final_message": False, "min_tokens": 0,
             "separate_reasoning": True, "stream_reasoning": True, "return_hidden_states": False}  # fmt: skip
    a = server.client().chat.completions.create(messages=MESSAGES, **greedy())
    b = server.client().chat.completions.create(messages=MESSAGES, **greedy(extra))
    assert b.choices[0].message.content == a.choices[0].message.content


def test_prompt_logprobs_with_echo_and_natively(server, tok, hf):
    """OpenAI's echo with logprobs (how lm-evaluation-harness scores a continuation) and SGLang's
    logprob_start_len: each prompt token after the first gets transformers' log-probability and top
    alternatives; the first has none. The prompt as token ids and as text, streamed or not."""
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)
    want = [None] + [float(logp[j, ids[j + 1]]) for j in range(len(ids) - 1)]
    best = [None] + [int(logp[j].argmax()) for j in range(len(ids) - 1)]

    def check(tokens, lps, tops):
        assert tokens[: len(ids)] == [tok.decode([t]) for t in ids]
        assert lps[0] is None and tops[0] is None
        assert lps[1 : len(ids)] == pytest.approx(want[1:], abs=1e-4)
        assert [max(t, key=t.get) for t in tops[1 : len(ids)]] == [tok.decode([b]) for b in best[1:]]

    client = server.client()
    for prompt in (ids, PROMPT):
        r = client.completions.create(prompt=prompt, echo=True, logprobs=2, **{**greedy(), "max_tokens": 1})
        lp = r.choices[0].logprobs
        check(lp.tokens, lp.token_logprobs, lp.top_logprobs)
        assert len(lp.tokens) == len(ids) + 1 and r.choices[0].text.startswith(PROMPT)
        assert lp.text_offset[: len(ids)] == [len("".join(lp.tokens[:j])) for j in range(len(ids))]
    chunks = list(client.completions.create(prompt=ids, echo=True, logprobs=2, stream=True, **greedy()))
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    lps = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
    tops = [x for c in chunks for x in c.choices[0].logprobs.top_logprobs]
    check(tokens, lps, tops)
    assert len(tokens) == len(ids) + N_TOKENS

    body = {"input_ids": ids, "return_logprob": True, "logprob_start_len": 2, "top_logprobs_num": 2,
            "return_text_in_logprobs": True, "sampling_params": {"max_new_tokens": 2, "temperature": 0}}  # fmt: skip
    meta = server.post("/generate", body).json()["meta_info"]
    assert [t[1] for t in meta["input_token_logprobs"]] == ids[2:]
    assert [t[0] for t in meta["input_token_logprobs"]] == pytest.approx(want[2:], abs=1e-4)
    assert [t[0][1] for t in meta["input_top_logprobs"]] == best[2:]
    body["logprob_start_len"] = 0
    meta = server.post("/generate", body).json()["meta_info"]
    assert meta["input_token_logprobs"][0][0] is None and meta["input_top_logprobs"][0] is None


def test_vllm_prompt_logprobs(server, tok, hf):
    """vLLM's prompt_logprobs: per prompt token (none for the first) the token's logprob and rank in the
    vocabulary, and the top alternatives, as transformers has them; on completions (every sample of every prompt)
    and chat (the chat template's prompt); refused with stream, as vLLM does."""
    ids = tok.encode(PROMPT)

    def check(prompt_lps, ids):
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)
        assert len(prompt_lps) == len(ids) and prompt_lps[0] is None
        for j in range(1, len(ids)):
            row, entry = logp[j - 1], prompt_lps[j]
            mine = entry[str(ids[j])]
            assert mine["logprob"] == pytest.approx(float(row[ids[j]]), abs=1e-4)
            assert mine["rank"] == int((row > row[ids[j]] + 1e-6).sum()) + 1 and mine["decoded_token"]
            best = int(row.argmax())
            assert entry[str(best)]["rank"] == 1 and len(entry) in (2, 3)

    client = server.client()
    r = client.completions.create(prompt=[ids, ids[:3]], n=2, **greedy({"prompt_logprobs": 2}))
    for i, c in enumerate(r.choices):
        check(c.model_extra["prompt_logprobs"], ids if i < 2 else ids[:3])
    r = client.chat.completions.create(messages=MESSAGES, **greedy({"prompt_logprobs": 1}))
    check(r.model_extra["prompt_logprobs"], chat_ids(tok, MESSAGES))
    plain = client.chat.completions.create(messages=MESSAGES, **greedy())
    assert plain.model_extra["prompt_logprobs"] is None and plain.choices[0].message == r.choices[0].message


def test_vllm_structured_output_fields(server):
    """vLLM's guided_* fields and structured_outputs object constrain the output as SGLang's fields do; a choice
    is one of its strings (sampled at temperature 1 from a random model, several seeds)."""
    import json as json_module
    import re

    choices = ["yes", "no", 'say "maybe"']
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    cases = [
        ({"guided_choice": choices}, lambda t: t in choices),
        ({"structured_outputs": {"choice": choices}}, lambda t: t in choices),
        ({"guided_regex": "[a-c]{2}x"}, lambda t: re.fullmatch("[a-c]{2}x", t)),
        ({"structured_outputs": {"regex": "[0-9]{3}"}}, lambda t: re.fullmatch("[0-9]{3}", t)),
        ({"guided_json": schema}, lambda t: isinstance(json_module.loads(t)["n"], int)),
        ({"structured_outputs": {"json": schema}}, lambda t: isinstance(json_module.loads(t)["n"], int)),
        ({"guided_grammar": 'root ::= "a" "b"+'}, lambda t: re.fullmatch("ab+", t)),
    ]
    client = server.client()
    for extra, ok in cases:
        for seed in range(3):
            r = client.completions.create(
                model=NAME, prompt=PROMPT, max_tokens=24, temperature=1.0, seed=seed, extra_body=extra
            )
            text = r.choices[0].text
            assert r.choices[0].finish_reason == "stop" and ok(text), (extra, text)
    both = {"guided_regex": "a", "regex": "b"}
    r = server.post(COMPLETIONS, {"prompt": PROMPT, **both})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex"


# ---- completions -----------------------------------------------------------------------------------------------
def test_completions_async_greedy_streamed_and_not(server, tok, hf):
    ids = tok.encode(PROMPT)
    ref_tokens, ref_lps = hf_greedy(hf, ids, N_TOKENS)

    async def run():
        client = server.async_client()
        r = await client.completions.create(prompt=PROMPT, logprobs=2, **greedy())
        stream = await client.completions.create(
            prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **greedy()
        )
        chunks = [c async for c in stream]
        await client.close()
        return r, chunks

    r, chunks = asyncio.run(run())
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == decode(tok, ref_tokens)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), N_TOKENS)
    lp = r.choices[0].logprobs
    assert lp.tokens == [tok.decode([t]) for t in ref_tokens]
    assert lp.token_logprobs == pytest.approx([x[t].item() for t, x in zip(ref_tokens, ref_lps)], abs=1e-4)
    for top, x in zip(lp.top_logprobs, ref_lps):
        vals, top_ids = x.topk(2)
        assert sorted(top.values(), reverse=True) == pytest.approx(vals.tolist(), abs=1e-4)
        assert set(top) == {tok.decode([i]) for i in top_ids.tolist()}
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(N_TOKENS)]

    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == N_TOKENS and chunks[-1].usage.prompt_tokens == len(ids)


def test_completions_prompt_forms(server, tok, hf):
    p1, p2 = "Paris is the capital", "A radix tree"
    ids1, ids2 = tok.encode(p1), tok.encode(p2)
    ref1, ref2 = (decode(tok, hf_greedy(hf, i, N_TOKENS)[0]) for i in (ids1, ids2))
    client = server.client()
    for prompt in ([p1, p2], [ids1, ids2]):
        r = client.completions.create(prompt=prompt, **greedy())
        assert [c.index for c in r.choices] == [0, 1]
        assert [c.text for c in r.choices] == [ref1, ref2]
        assert r.usage.prompt_tokens == len(ids1) + len(ids2)
    assert client.completions.create(prompt=ids1, **greedy()).choices[0].text == ref1
    r = client.completions.create(prompt=p1, echo=True, **greedy())
    assert r.choices[0].text == p1 + ref1


def test_tokenize_and_detokenize(server, tok):
    r = server.post("/tokenize", {"model": NAME, "prompt": PROMPT})
    assert r.status_code == 200 and r.json()["tokens"] == tok.encode(PROMPT)
    r = server.post("/tokenize", {"messages": MESSAGES})
    assert r.json()["tokens"] == chat_ids(tok, MESSAGES) and r.json()["count"] == len(chat_ids(tok, MESSAGES))
    ids = tok.encode("héllo wörld, 東京 😀")
    assert server.post("/detokenize", {"tokens": ids}).json()["text"] == tok.decode(ids)
    # the chat template options, as on chat completions and in vLLM's /tokenize
    continued = MESSAGES + [{"role": "assistant", "content": "The city"}]
    for messages, options, args in [
        (MESSAGES, {"add_generation_prompt": False}, {"add_generation_prompt": False}),
        (MESSAGES, {"chat_template_kwargs": {"system_note": "Be brief."}}, {"system_note": "Be brief."}),
        (continued, {"continue_final_message": True, "add_generation_prompt": False},
         {"continue_final_message": True, "add_generation_prompt": False}),
    ]:  # fmt: skip
        want = tok.apply_chat_template(messages, tokenize=True, **{"add_generation_prompt": True, **args})
        want = list(want["input_ids"] if hasattr(want, "keys") else want)
        assert server.post("/tokenize", {"messages": messages, **options}).json()["tokens"] == want
    assert server.post("/tokenize", {"messages": MESSAGES, "continue_final_message": True}).status_code == 400


# ---- many at once ----------------------------------------------------------------------------------------------
def test_48_concurrent_streams_complete_with_their_lengths(server):
    lengths = [4 + i % 13 for i in range(48)]

    async def one(client, i: int, n: int) -> tuple[int, str | None, int]:
        stream = await client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": f"request {i}"}],
            max_tokens=n,
            temperature=0.8,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        reason, usage = None, None
        async for c in stream:
            if c.choices and c.choices[0].finish_reason:
                reason = c.choices[0].finish_reason
            usage = c.usage or usage
        return usage.completion_tokens, reason, i

    async def run():
        client = server.async_client()
        out = await asyncio.gather(*(one(client, i, n) for i, n in enumerate(lengths)))
        await client.close()
        return out

    results = asyncio.run(run())
    assert [r[0] for r in results] == lengths
    assert all(r[1] == "length" for r in results)
    m = server.metrics()
    assert m["minisgl:generation_tokens_total"] >= sum(lengths)


# ---- bad input ------------------------------------------------------------------------------------------------
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
BAD = [
    # (path, body, status, param, code)
    (CHAT, b"{not json", 400, None, None),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature", None),
    (CHAT, {"messages": "hi"}, 400, "messages", None),
    (CHAT, {}, 400, "messages", None),
    (CHAT, {"messages": []}, 400, "messages", None),
    (CHAT, {"messages": USER, "temperature": -1}, 400, "temperature", None),
    (CHAT, {"messages": USER, "top_p": 1.5}, 400, "top_p", None),
    (CHAT, {"messages": USER, "n": 0}, 400, "n", None),
    (CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens", None),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", None),
    (CHAT, {"messages": USER, "presence_penalty": 3}, 400, "presence_penalty", None),
    (CHAT, {"messages": USER, "seed": 2**70}, 400, "seed", None),
    (CHAT, {"messages": USER, "max_tokens": 5000}, 400, "max_tokens", "context_length_exceeded"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "hi " * 1000}], "max_tokens": 4},
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "hi " * 300}], "max_tokens": 800},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages",
        None,
    ),
    (CHAT, {"messages": USER, "stop_token_ids": [384]}, 400, "stop_token_ids", None),
    (CHAT, {"messages": USER, "model": "gpt-4"}, 404, "model", "model_not_found"),
    (COMPLETIONS, {"prompt": [1, 2, 384]}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": [1, -2]}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": []}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": [[5, 6], [7, 999]]}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": {"a": 1}}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", None),
    (COMPLETIONS, {"prompt": "hi", "model": "other"}, 404, "model", "model_not_found"),
    ("/detokenize", {"tokens": [5, 10_000]}, 400, "tokens", None),
    (CHAT, {"messages": [{"role": "narrator", "content": "hi"}]}, 400, "messages", None),
    (CHAT, {"messages": [{"role": "function", "name": "f", "content": "{}"}]}, 400, "messages", None),
    (CHAT, {"messages": USER, "logit_bias": {"abc": 1}}, 400, "logit_bias", None),
    (CHAT, {"messages": USER, "logit_bias": {"5": 101}}, 400, "logit_bias", None),
    (COMPLETIONS, {"prompt": "hi", "logit_bias": {"384": 1}}, 400, "logit_bias", None),
    # OpenAI fields that would change the answer and are not supported: refused, never dropped
    (CHAT, {"messages": USER, "functions": [{"name": "f"}]}, 400, "functions", None),
    (CHAT, {"messages": USER, "function_call": "auto"}, 400, "function_call", None),
    (CHAT, {"messages": USER, "modalities": ["text", "audio"]}, 400, "modalities", None),
    (CHAT, {"messages": USER, "audio": {"voice": "alloy", "format": "wav"}}, 400, "audio", None),
    (COMPLETIONS, {"prompt": "hi", "best_of": 3}, 400, "best_of", None),
    (COMPLETIONS, {"prompt": "hi", "stop": [f"s{i}" for i in range(65)]}, 400, "stop", None),
    (COMPLETIONS, {"prompt": "hi", "suffix": "the end"}, 400, "suffix", None),
    # Fields this server does not know, other servers' options among them: a 400 naming them, as OpenAI answers
    (CHAT, {"messages": USER, "logits_processors": ["x"]}, 400, "logits_processors", None),
    (CHAT, {"messages": USER, "reasoning_effort": "low"}, 400, "reasoning_effort", None),
    (COMPLETIONS, {"prompt": "hi", "use_beam_search": True}, 400, "use_beam_search", None),
    (
        CHAT,
        {"messages": USER, "stream": True, "stream_options": {"include_usage": True, "x": 1}},
        400,
        "stream_options",
        None,
    ),
    (CHAT, {"messages": USER, "return_hidden_states": True}, 400, "return_hidden_states", None),
    (CHAT, {"messages": USER, "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens", None),
    (CHAT, {"messages": USER, "min_tokens": -1}, 400, "min_tokens", None),
    (CHAT, {"messages": USER, "min_tokens": 2, "regex": "a+"}, 400, "min_tokens", None),
    (COMPLETIONS, {"prompt": "hi " * 300, "max_tokens": None, "min_tokens": 400}, 400, "min_tokens", None),
    (CHAT, {"messages": USER, "continue_final_message": True, "add_generation_prompt": False}, 400, "messages", None),
    (CHAT, {"messages": USER, "continue_final_message": True}, 400, "messages", None),
    (CHAT, {"messages": USER, "chat_template_kwargs": {"tools": []}}, 400, "messages", None),
    (COMPLETIONS, {"prompt": "hi", "echo": True, "logprobs": 1, "n": 2}, 400, "n", None),
    (COMPLETIONS, {"prompt": "hi", "echo": True, "logprobs": 21}, 400, "top_logprobs", None),
    (COMPLETIONS, {"prompt": "hi", "prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs", None),
    (CHAT, {"messages": USER, "prompt_logprobs": 21}, 400, "prompt_logprobs", None),
    (CHAT, {"messages": USER, "guided_choice": []}, 400, "guided_choice", None),
    (CHAT, {"messages": USER, "structured_outputs": {"json_": {}}}, 400, "structured_outputs", None),
]


@pytest.mark.parametrize("path,body,status,param,code", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_is_an_openai_error(server, path, body, status, param, code):
    if isinstance(body, bytes):
        r = server.post(path, content=body)
    else:
        r = server.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == ("invalid_request_error" if status in (400, 404) else err["type"])
    assert err["param"] == param and err["code"] == code
    assert err["message"]


@pytest.mark.parametrize(
    "path,body,param",
    [
        (COMPLETIONS, {"prompt": "hi " * 20_000}, "prompt"),
        (CHAT, {"messages": [{"role": "user", "content": "hi " * 20_000}]}, "messages"),
        ("/tokenize", {"prompt": "hi " * 20_000}, "prompt"),
    ],
)
def test_prompt_far_beyond_the_context_is_refused_before_tokenizing(server, path, body, param):
    """60,000 characters cannot fit the tiny model's 1,024 tokens with tokens of at most 13 characters: refused
    from its length ("at least"), where tokenizing megabytes would hold up every other request."""
    r = server.post(path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "at least" in err["message"], err
    assert path == "/tokenize" or err["code"] == "context_length_exceeded"


def test_unknown_route_and_wrong_method_are_the_clients_errors(server):
    for r, status in ((httpx.get(f"{server.url}/v1/nothing"), 404), (httpx.delete(f"{server.url}{COMPLETIONS}"), 405)):
        assert r.status_code == status
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_bad_stream_request_errors_before_streaming(server):
    r = server.post(CHAT, {"messages": USER, "stream": True, "max_tokens": 5000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_server_survives_bad_input(server, tok, hf):
    # after the whole matrix above, the server still answers correctly, and no request is left running
    assert httpx.get(f"{server.url}/health").status_code == 200
    ids = tok.encode(PROMPT)
    r = server.client().completions.create(prompt=PROMPT, **greedy())
    assert r.choices[0].text == decode(tok, hf_greedy(hf, ids, N_TOKENS)[0])


def test_metrics_are_prometheus(server):
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "num_running_reqs",
        "num_queue_reqs",
        "token_usage",
        "cache_hit_rate",
        "prompt_tokens_total",
        "generation_tokens_total",
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_bucket",
        "e2e_request_latency_seconds_count",
    ):
        assert f"minisgl:{name}{{" in text, name
    m = server.metrics()
    assert m["minisgl:prompt_tokens_total"] > 0 and m["minisgl:num_running_reqs"] == 0
    assert math.isfinite(m["minisgl:cache_hit_rate"]) and m["minisgl:cache_hit_rate"] > 0  # repeated prompts hit
