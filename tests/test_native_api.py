"""SGLang's native API (/generate and friends) on the default model: the same greedy text as /v1/completions,
SGLang's response shapes, and a 400 in OpenAI's error format for every bad input."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from server_util import serve, wait_for

pytestmark = pytest.mark.slow  # starts a server

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ["--device", "cpu", "--dtype", "float32", "--max-total-tokens", "4096"]
    yield from serve(tmp_path_factory, "server-native", args)


def generate(server, body: dict) -> httpx.Response:
    return server.post("/generate", json=body)


def sse(server, path: str, body: dict) -> list:
    """The data events of a stream, [DONE] included as the string."""
    events = []
    h = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.stream("POST", f"{server.url}{path}", json=body, headers=h, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def completion(server, prompt, max_tokens: int, **kw) -> dict:
    r = server.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_generate_matches_completions(server):
    ref = completion(server, PROMPT, 16, logprobs=2)
    r = generate(
        server,
        {
            "text": PROMPT,
            "sampling_params": {"temperature": 0, "max_new_tokens": 16},
            "return_logprob": True,
            "top_logprobs_num": 2,
            "return_text_in_logprobs": True,
        },
    )
    assert r.status_code == 200, r.text
    out = r.json()
    choice = ref["choices"][0]
    assert out["text"] == choice["text"] and out["text"].strip()
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == ref["usage"]["prompt_tokens"]
    assert meta["completion_tokens"] == ref["usage"]["completion_tokens"] == 16
    assert meta["finish_reason"] == {"type": "length", "length": 16}
    assert isinstance(meta["id"], str) and meta["id"] and meta["cached_tokens"] >= 0
    # logprobs: SGLang's [logprob, token_id, text] triples, the same values as the completions' logprobs
    lps = meta["output_token_logprobs"]
    assert [t[2] for t in lps] == choice["logprobs"]["tokens"]
    assert [t[0] for t in lps] == pytest.approx(choice["logprobs"]["token_logprobs"], abs=1e-4)
    assert all(len(top) == 2 and top[0][0] >= top[1][0] for top in meta["output_top_logprobs"])
    assert meta["output_top_logprobs"][0][0][1] == lps[0][1]  # greedy: the chosen token is the best one

    # the same prompt as token ids, and a batch of both prompts, give the same texts in order
    ids = server.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_ids = generate(server, {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 16}})
    assert by_ids.json()["text"] == out["text"]
    other = "Once upon a time"
    batch = generate(server, {"text": [PROMPT, other], "sampling_params": {"temperature": 0, "max_new_tokens": 8}})
    assert batch.status_code == 200, batch.text
    texts = [o["text"] for o in batch.json()]
    assert texts == [completion(server, p, 8)["choices"][0]["text"] for p in (PROMPT, other)]


def test_generate_stream_matches_completions_stream(server):
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True}
    ref = "".join(e["choices"][0]["text"] for e in sse(server, "/v1/completions", body)[:-1] if e["choices"])
    events = sse(
        server,
        "/generate",
        {"text": PROMPT, "stream": True, "sampling_params": {"temperature": 0, "max_new_tokens": 12}},
    )
    assert events[-1] == "[DONE]" and len(events) > 3
    chunks = events[:-1]
    texts = [e["text"] for e in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative, as SGLang streams
    assert texts[-1] == ref
    assert all(e["meta_info"]["finish_reason"] is None for e in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert chunks[-1]["meta_info"]["completion_tokens"] == 12
    assert len({e["meta_info"]["id"] for e in chunks}) == 1


def test_stop_and_n_and_rid(server):
    text = completion(server, PROMPT, 16)["choices"][0]["text"]
    stop = text.strip().split()[1]  # a word the greedy answer reaches
    r = generate(
        server,
        {
            "text": PROMPT,
            "rid": "my-rid-1",
            "sampling_params": {"temperature": 0, "max_new_tokens": 16, "stop": [stop]},
        },
    ).json()
    assert r["meta_info"]["id"] == "my-rid-1"
    assert r["meta_info"]["finish_reason"]["type"] == "stop" and stop not in r["text"]
    assert text.startswith(r["text"])
    # n samples come back as a list; a seed makes sampled output reproducible
    body = {"text": PROMPT, "sampling_params": {"temperature": 1.0, "max_new_tokens": 8, "n": 2, "sampling_seed": 7}}
    a, b = generate(server, body).json(), generate(server, body).json()
    assert isinstance(a, list) and len(a) == 2 and [o["text"] for o in a] == [o["text"] for o in b]


def test_output_constraints_in_sampling_params(server):
    """SGLang's regex / json_schema in sampling_params constrain the output, as on the OpenAI endpoints."""
    import re

    pattern = r"(red|green|blue) [0-9]{3}"
    for seed in range(3):
        sp = {"temperature": 1.0, "sampling_seed": seed, "max_new_tokens": 16, "regex": pattern}
        r = generate(server, {"text": "Pick a colour and a number:", "sampling_params": sp})
        assert r.status_code == 200, r.text
        assert re.fullmatch(pattern, r.json()["text"]), r.json()["text"]
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    sp = {"temperature": 1.0, "sampling_seed": 7, "max_new_tokens": 32, "json_schema": json.dumps(schema)}
    r = generate(server, {"text": "A number as JSON:", "sampling_params": sp})
    assert r.status_code == 200, r.text
    assert isinstance(json.loads(r.json()["text"])["n"], int)
    both = {"max_new_tokens": 4, "regex": "a", "ebnf": 'root ::= "a"'}
    assert generate(server, {"text": "x", "sampling_params": both}).status_code == 400


def test_info_and_health(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/health_generate", timeout=60).status_code == 200
    for path in ("/get_model_info", "/model_info"):
        info = httpx.get(f"{server.url}{path}").json()
        assert info["model_path"].endswith(".gguf") and info["is_generation"] is True
        assert info["tokenizer_path"] and info["context_length"] > 0
    for path in ("/get_server_info", "/server_info"):
        info = httpx.get(f"{server.url}{path}").json()
        assert info["max_total_tokens"] == 4096 and info["device"] == "cpu" and info["dp_rank"] == 0
        assert info["context_length"] > 0 and info["model_path"].endswith(".gguf")


def test_flush_cache_drops_the_prefix_cache_and_refuses_while_running(server):
    body = {"text": PROMPT * 4, "sampling_params": {"temperature": 0, "max_new_tokens": 2}}
    generate(server, body)
    assert generate(server, body).json()["meta_info"]["cached_tokens"] > 0
    r = server.post("/flush_cache")
    assert r.status_code == 200, r.text
    assert generate(server, body).json()["meta_info"]["cached_tokens"] == 0

    # while a request runs the cache is not flushed: an error status, and the request is unharmed
    result = {}
    long = {
        "text": "Tell me a story",
        "rid": "long-1",
        "sampling_params": {"temperature": 0, "max_new_tokens": 3000, "ignore_eos": True},
    }
    t = threading.Thread(target=lambda: result.setdefault("r", generate(server, long)))
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.metrics().get("minisgl:num_running_reqs", 0) < 1:
        time.sleep(0.05)
    r = server.post("/flush_cache")
    assert r.status_code == 400 and "running" in r.json()["error"]["message"]
    # /abort_request ends it: its response reports the abort
    assert server.post("/abort_request", json={"rid": "long-1"}).status_code == 200
    t.join(timeout=30)
    out = result["r"].json()
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert out["meta_info"]["id"] == "long-1" and out["meta_info"]["completion_tokens"] < 3000
    # the scheduler frees it a moment after the response (which does not wait for that)
    assert wait_for(lambda: server.post("/flush_cache").status_code == 200, 10)


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/generate", {}, "text"),
        ("/generate", {"text": "a", "input_ids": [1]}, "text"),
        ("/generate", {"text": []}, "text"),
        ("/generate", {"input_ids": []}, "input_ids"),
        ("/generate", {"text": "a", "sampling_params": {"max_new_token": 4}}, "sampling_params"),
        ("/generate", {"text": "a", "unknown_field": 1}, "unknown_field"),
        ("/generate", {"text": "a", "sampling_params": {"temperature": -1}}, "temperature"),
        ("/generate", {"text": "a", "sampling_params": {"top_p": 0}}, "top_p"),
        ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": 0}}, "max_new_tokens"),
        ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": 10**6}}, "max_new_tokens"),
        ("/generate", {"text": "a", "sampling_params": {"seed": 1, "sampling_seed": 2}}, "sampling_params"),
        ("/generate", {"input_ids": [1, 2, 10**7]}, "input_ids"),
        ("/generate", {"text": "a", "sampling_params": {"stop_token_ids": [10**7]}}, "stop_token_ids"),
        ("/generate", {"text": ["a", "b"], "rid": "x"}, "rid"),
        ("/generate", {"text": "a", "rid": ["x"]}, "rid"),
        ("/generate", {"text": "a", "return_logprob": True, "logprob_start_len": -2}, "logprob_start_len"),
        ("/generate", {"text": "a", "top_logprobs_num": 2}, "top_logprobs_num"),
        ("/generate", {"text": "a", "return_hidden_states": True}, None),
        ("/generate", {"text": "a", "model": "another-model"}, "model"),
        ("/generate", {"text": "a", "sampling_params": {"temperature": "hot"}}, "sampling_params"),
        ("/abort_request", {}, "rid"),
        ("/abort_request", {"rid": 5}, "rid"),
        ("/abort_request", {"rid": "x", "force": True}, "force"),
    ],
)
def test_bad_inputs_are_400(server, path, body, param):
    r = server.post(path, json=body)
    expected = 404 if param == "model" else 400
    assert r.status_code == expected, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err
    assert generate(server, {"text": "ok", "sampling_params": {"max_new_tokens": 1}}).status_code == 200


def test_bad_json_and_bad_stream_request_are_400(server):
    r = server.post("/generate", content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    h = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.stream(
        "POST",
        f"{server.url}/generate",
        headers=h,
        timeout=60,
        json={"text": "a", "stream": True, "sampling_params": {"max_new_tokens": 10**6}},
    ) as r:
        assert r.status_code == 400
