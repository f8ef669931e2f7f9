"""Faults around a real server: clients that vanish mid-request, a serving process that dies, a model that
cannot load. The radix cache is off here, so KV in use returns to exactly 0 once no request holds any.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import httpx
import pytest
from server_util import REPO, TINY_ARGS, free_port, minisgl_env, serve, tiny_checkpoint, wait_for, wait_gone

pytestmark = pytest.mark.slow  # starts servers and kills processes

MAX_TOKENS = 16000  # seconds of decoding: only an abort ends such a request within the test


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory, long=True)
    yield from serve(tmp_path_factory, "server-faults", ["--model", ckpt, *TINY_ARGS, "--disable-radix-cache"])


def body(server, stream: bool) -> dict:
    return {
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def idle_after_abort(server, tokens_before: float) -> None:
    """The request is no longer running, its KV is free, and it was ended early (not run to completion)."""
    assert wait_for(lambda: server.metrics()["minisgl:num_running_reqs"] == 0, 15), server.log()[-2000:]
    assert wait_for(lambda: server.metrics()["minisgl:token_usage"] == 0.0, 5)
    assert server.metrics()["minisgl:generation_tokens_total"] - tokens_before < MAX_TOKENS


def test_disconnect_mid_stream_aborts_and_frees_kv(server):
    before = server.metrics()["minisgl:generation_tokens_total"]
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body(server, True), timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(20)) if line.startswith("data: ")]
        assert len(got) >= 5
    idle_after_abort(server, before)


def test_disconnect_while_waiting_for_a_whole_answer_aborts(server):
    before = server.metrics()["minisgl:generation_tokens_total"]
    with pytest.raises(httpx.TimeoutException):  # the client gives up and closes the connection
        httpx.post(f"{server.url}/v1/chat/completions", json=body(server, False), timeout=1.5)
    idle_after_abort(server, before)


def test_server_still_serves_after_aborts(server):
    r = server.client().completions.create(
        model=server.client().models.list().data[0].id,
        prompt="hello",
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_killed_scheduler_takes_the_server_down(server):
    procs = server.descendants()
    server.child("minisgl-sched").kill()
    rc = server.proc.wait(timeout=30)
    assert rc != 0
    assert wait_gone(procs, 10) == []
    assert "scheduler process died (exit code -9)" in server.log()


def test_model_that_cannot_load_exits_nonzero_with_the_error(tmp_path, tmp_path_factory):
    ckpt = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint(tmp_path_factory), ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["NoSuchForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "minisgl", "--model", str(ckpt), *TINY_ARGS, "--port", str(free_port())]
    p = subprocess.run(cmd, env=minisgl_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    log = p.stdout + p.stderr
    assert p.returncode != 0
    assert "unsupported architecture 'NoSuchForCausalLM'" in log  # the child's own error, with its traceback
    assert "Traceback" in log and "scheduler process died" in log


def test_port_in_use_fails_before_loading(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "minisgl",
            "--model",
            tiny_checkpoint(tmp_path_factory),
            *TINY_ARGS,
            "--port",
            str(port),
        ]
        p = subprocess.run(cmd, env=minisgl_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in p.stderr
