"""Seeded fuzzes against one real server.

The first sends requests invalid by construction (one broken field on top of a valid base), including lone
UTF-16 surrogates wherever a string goes: such text must be escaped in what the server echoes, not turned
into a 500 that drops the keep-alive connection; every answer is a clean 4xx OpenAI error. The second mutates
rich valid requests (tools, tool turns, response formats, streams, the native API) at random places in their
JSON: every answer is a success or a clean 4xx, never a 5xx or a dropped connection. One keep-alive client
sends each set; afterwards the server still answers a good request.
"""

from __future__ import annotations

import copy
import json
import random

import httpx
import pytest
from server_util import TINY_ARGS, serve, tiny_checkpoint

pytestmark = pytest.mark.slow  # starts a server

SEED = 1234
N = 300
SURROGATES = ["\ud83d", "\udc00", "a\ud800b", "\udfff\ud800"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ["--model", tiny_checkpoint(tmp_path_factory), *TINY_ARGS]
    yield from serve(tmp_path_factory, "server-fuzz", args)


def _base(endpoint: str, model: str) -> dict:
    if endpoint == "/v1/chat/completions":
        return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return {"model": model, "prompt": "hi", "max_tokens": 2}


def _breakages(endpoint: str, model: str, rng: random.Random) -> list:
    """Ways to make a valid request invalid: (field path, bad value) pairs, or raw bodies (bytes)."""
    s = rng.choice(SURROGATES)
    chat = endpoint == "/v1/chat/completions"
    big = rng.choice([2**63, 2**70, -(2**64)])
    out: list = [
        ("model", s),
        ("model", model + s),
        ("model", 12),
        ("model", ["x"]),
        ("temperature", -rng.random() - 0.01),
        ("temperature", "hot"),
        ("top_p", 1 + rng.random()),
        ("top_p", 0),
        ("top_k", -5),
        ("min_p", 2.0),
        ("n", 0),
        ("n", 10_000),
        ("n", big),
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", big),
        ("max_tokens", 10**9),
        ("seed", big),
        ("seed", "x"),
        ("frequency_penalty", 3.5),
        ("presence_penalty", -9),
        ("repetition_penalty", 0),
        ("stop", [s]),
        ("stop", 5),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", [10**7]),
        ("stream", "maybe"),
        ("stream_options", 3),
        ("regex", "(" * rng.randint(1, 5)),
        ("regex", s),
        ("ebnf", "root ::= " + s),
        ("ebnf", "root := x"),
        ("json_schema", "{not json"),
        ("json_schema", json.dumps({"type": rng.choice([1, "nope", s])})),
        ("regex", "[a-z]"),
        ("logprobs", "many"),
        ("min_tokens", -1),
        ("min_tokens", big),
        ("min_tokens", 3, "regex", "a+"),
        ("no_stop_trim", "maybe"),
        ("guided_json", "{not json"),
        ("guided_choice", []),
        ("stream_options", {"continuous_usage_stats": "x"}),
    ]
    if chat:
        out += [
            ("messages", []),
            ("messages", "hi"),
            ("messages", [{"content": "no role"}]),
            ("messages", [{"role": "user", "content": s}]),
            ("messages", [{"role": "user", "content": [{"type": "image_url"}]}]),
            ("response_format", {"type": rng.choice(["xml", "yaml", s, ""])}),
            ("response_format", "json"),
            ("response_format", {"type": "json_schema"}),
            ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": s}}}),
            ("tool_choice", "required"),
            ("tools", [{"type": "retrieval"}]),
            ("tools", [{"type": "function", "function": {"name": "f"}}], "tool_choice", s),
            ("top_logprobs", 5),
            ("top_logprobs", 50, "logprobs", True),
            ("continue_final_message", True),
            ("chat_template_kwargs", {"messages": s}),
            ("chat_template_kwargs", s),
        ]
    else:
        out += [
            ("prompt", s),
            ("prompt", []),
            ("prompt", [10**7]),
            ("prompt", [[1, -2]]),
            ("prompt", None),
            ("prompt", {"text": "x"}),
            ("echo", True, "logprobs", 2, "n", 2),
            ("logprobs", 50),
        ]
    out += [
        b"",
        b"{",
        b"[]",
        b"null",
        b"\xff\xfe{}",
        b'{"model": "\\ud83d"',
        b"NaN",
        json.dumps(_base(endpoint, model))[:-1].encode() + b', "temperature": NaN}',
        json.dumps(_base(endpoint, model))[:-1].encode() + b', "top_p": Infinity}',
        b'{"messages": ' + b"[" * 2000 + b"]" * 2000 + b"}",
    ]
    return out


def _requests(model: str) -> list[tuple[str, bytes]]:
    rng = random.Random(SEED)
    reqs = []
    for _ in range(N):
        endpoint = rng.choice(["/v1/chat/completions", "/v1/completions"])
        broken = rng.choice(_breakages(endpoint, model, rng))
        if isinstance(broken, bytes):
            reqs.append((endpoint, broken))
            continue
        body = _base(endpoint, model)
        for k, v in zip(broken[::2], broken[1::2]):
            body[k] = v
        if "regex" in body and body["regex"] == "[a-z]":  # valid alone: paired with a second constraint
            body["ebnf"] = 'root ::= "a"'
        reqs.append((endpoint, json.dumps(body).encode()))  # ensure_ascii keeps lone surrogates as \\uXXXX
    return reqs


def test_malformed_requests_get_clean_4xx(server):
    model = server.client().models.list().data[0].id
    headers = {"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"}
    statuses = []
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        for endpoint, body in _requests(model):
            r = client.post(endpoint, content=body)  # a dropped keep-alive connection raises here
            assert 400 <= r.status_code < 500, (endpoint, body[:200], r.status_code, r.text[:300])
            err = r.json()["error"]
            assert err["message"] and err["type"] == "invalid_request_error", err
            statuses.append(r.status_code)
        good = client.post("/v1/chat/completions", json=_base("/v1/chat/completions", model))
        assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] is not None
    assert len(statuses) == N and statuses.count(400) > N // 2


# ---- structural mutations of valid requests ----------------------------------------------------------------
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5}}, "required": ["a"]}
RICH = [
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}],
                              "max_tokens": 3, "temperature": 0.5, "seed": 3, "logit_bias": {"7": 2}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                              "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}, "n": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w?"}], "tools": [TOOL],
                              "tool_choice": "required", "max_tokens": 16}),
    ("/v1/chat/completions", {"messages": [
        {"role": "user", "content": "w?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "P"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], "tools": [TOOL], "max_tokens": 3}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "j"}], "max_tokens": 8, "logprobs": True,
                              "top_logprobs": 2, "response_format": {
                                  "type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}),
    ("/v1/completions", {"prompt": [[1, 2, 3], "abc"], "max_tokens": 3, "regex": "[a-z]{1,3}", "logprobs": 2}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 3, "ebnf": 'root ::= "a" | "b"', "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Su"}],
                              "max_tokens": 4, "min_tokens": 2, "stop": ["x"], "no_stop_trim": True,
                              "continue_final_message": True, "add_generation_prompt": False,
                              "chat_template_kwargs": {"system_note": "n"}, "stream": True,
                              "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 4, "min_tokens": 3, "stop": "a",
                         "include_stop_str_in_output": True, "store": True, "metadata": {"k": "v"}}),
    ("/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 3, "json_schema": SCHEMA}}),
    ("/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 3, "min_new_tokens": 2, "no_stop_trim": True,
                                                     "stop": "a"}}),
    ("/generate", {"input_ids": [[1, 2, 3], [4, 5]], "sampling_params": {"max_new_tokens": 2}, "stream": True,
                   "return_logprob": True, "top_logprobs_num": 2}),
]  # fmt: skip
VALUES = [None, True, 0, -1, 2**63, 1e308, -0.5, "", "\ud83d", "x" * 3000, [], {}, [1, 2], {"type": "x"},
          "function", "json_schema", "tool", "required", {"type": "function", "function": {"name": 5}}]  # fmt: skip
KEYS = ["tools", "tool_choice", "response_format", "n", "logit_bias", "best_of", "suffix", "functions", "stop",
        "max_completion_tokens", "parallel_tool_calls", "foo", "min_tokens", "chat_template_kwargs",
        "continue_final_message", "include_stop_str_in_output", "guided_json"]  # fmt: skip


def _paths(x, path=()):
    yield path
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else []
    for k, v in items:
        yield from _paths(v, (*path, k))


def _mutated(rng: random.Random) -> tuple[str, bytes]:
    endpoint, body = rng.choice(RICH)
    body = json.loads(json.dumps(body))
    for _ in range(rng.choice([1, 1, 2, 3])):
        path = rng.choice([p for p in _paths(body) if p])
        parent = body
        for k in path[:-1]:
            parent = parent[k]
        op = rng.randrange(3)
        if op == 0 and isinstance(parent, dict):
            del parent[path[-1]]
        elif op == 1 and isinstance(parent, dict):
            parent[rng.choice(KEYS)] = copy.deepcopy(rng.choice(VALUES))  # a shared {} could come to hold itself
        else:
            parent[path[-1]] = copy.deepcopy(rng.choice(VALUES))
    return endpoint, json.dumps(body).encode()


def test_mutated_requests_never_get_a_5xx(server):
    headers = {"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"}
    rng = random.Random(SEED)
    ok = 0
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        for _ in range(N):
            endpoint, body = _mutated(rng)
            r = client.post(endpoint, content=body)  # a dropped keep-alive connection raises here
            assert r.status_code == 200 or 400 <= r.status_code < 500, (endpoint, body[:300], r.text[:300])
            if r.status_code == 200:
                ok += 1
                assert "[DONE]" in r.text if r.headers["content-type"].startswith("text/event-stream") else r.json()
            else:
                assert r.json()["error"]["message"], r.text[:300]
        good = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert good.status_code == 200
    assert 0 < ok < N  # both kinds of answer were exercised
