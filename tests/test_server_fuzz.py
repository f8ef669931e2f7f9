"""A seeded fuzz of malformed requests against one real server: every answer is a clean 4xx OpenAI error.

Every generated request is invalid by construction (one broken field on top of a valid base), including lone
UTF-16 surrogates wherever a string goes: such text must be escaped in what the server echoes, not turned
into a 500 that drops the keep-alive connection. One keep-alive client sends them all and never sees a read
error; afterwards the server still answers a good request.
"""

from __future__ import annotations

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
        ]
    else:
        out += [
            ("prompt", s),
            ("prompt", []),
            ("prompt", [10**7]),
            ("prompt", [[1, -2]]),
            ("prompt", None),
            ("prompt", {"text": "x"}),
            ("echo", True, "logprobs", 2),
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
