"""Admission limits of a real server: --api-key, --max-queued-requests, --request-timeout; then SIGTERM.

One request runs at a time (--max-running-requests 1), so long requests queue behind each other. A "long"
request asks for 16000 tokens, which takes the tiny model on CPU well over the 8 s timeout.
"""

from __future__ import annotations

import asyncio
import signal

import httpx
import openai
import pytest
from server_util import TINY_ARGS, serve, tiny_checkpoint, wait_for, wait_gone

pytestmark = pytest.mark.slow  # starts servers

KEY = "sk-test-key"
TIMEOUT_S = 8  # the running request must outlive the queue checks even on a busy 2-core machine
LONG = dict(
    model=None,
    messages=[{"role": "user", "content": "go on"}],
    max_tokens=16000,
    temperature=0,
    extra_body={"ignore_eos": True},
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory, long=True)
    args = [
        "--model",
        ckpt,
        *TINY_ARGS,
        "--max-running-requests",
        "1",
        "--max-queued-requests",
        "2",
        "--request-timeout",
        str(TIMEOUT_S),
    ]
    yield from serve(tmp_path_factory, "server-limits", args, api_key=KEY)


def long_request(server) -> dict:
    return {**LONG, "model": server.client().models.list().data[0].id}


def body_of(kwargs: dict) -> dict:
    """The JSON body the openai client sends for these keyword arguments (extra_body merged in)."""
    return {**{k: v for k, v in kwargs.items() if k != "extra_body"}, **kwargs.get("extra_body", {})}


def test_api_key_required_except_health(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert r.status_code == 401
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 401
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    r = server.client().completions.create(model=long_request(server)["model"], prompt="hi", max_tokens=2)
    assert r.usage.completion_tokens <= 2


def test_queue_beyond_limit_is_refused_with_503(server):
    body = long_request(server)

    async def run():
        client = server.async_client()
        running = await client.chat.completions.create(stream=True, **body)
        await running.__anext__()  # the first request is running: later ones queue
        queued = [asyncio.create_task(client.chat.completions.create(**body)) for _ in range(2)]
        ok = await asyncio.to_thread(wait_for, lambda: server.metrics().get("minisgl:num_queue_reqs") == 2, 3)
        assert ok, "two requests should be queued"
        with pytest.raises(openai.APIStatusError) as e:
            await client.chat.completions.create(**body)
        for t in queued:
            t.cancel()
        await running.close()
        await asyncio.gather(*queued, return_exceptions=True)
        await client.close()
        return e.value

    err = asyncio.run(run())
    assert err.status_code == 503
    body = err.response.json()["error"]
    assert body["code"] == "server_overloaded" and body["type"] == "server_error"
    assert "overloaded" in body["message"] and "2 requests" in body["message"]
    assert wait_for(
        lambda: (
            server.metrics().get("minisgl:num_running_reqs") == 0
            and server.metrics().get("minisgl:num_queue_reqs") == 0
        ),
        10,
    )


def test_request_timeout_ends_request_and_frees_it(server):
    assert wait_for(lambda: server.metrics().get("minisgl:num_running_reqs") == 0, 10)
    with pytest.raises(openai.APIStatusError) as e:
        server.client().chat.completions.create(**long_request(server))
    assert e.value.status_code == 408
    err = e.value.response.json()["error"]
    assert err["code"] == "request_timeout" and f"{TIMEOUT_S}s" in err["message"]
    assert wait_for(lambda: server.metrics().get("minisgl:num_running_reqs") == 0, 5)

    # a stream that outlives the timeout ends with an error event, then [DONE]
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json={**body_of(long_request(server)), "stream": True},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"request_timeout"' in events[-2]
    assert wait_for(lambda: server.metrics().get("minisgl:num_running_reqs") == 0, 5)


def test_sigterm_stops_every_process(server):
    procs = server.descendants()
    assert len(procs) >= 3
    server.proc.send_signal(signal.SIGTERM)
    rc = server.proc.wait(timeout=30)  # prompt exit: the launcher's grace period is 5 s
    assert wait_gone(procs, 10) == []
    assert rc == 0, server.log()[-3000:]
    assert "received SIGTERM, shutting down" in server.log()
