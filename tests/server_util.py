"""Helpers for the server tests: run the real `python -m minisgl` as a subprocess, reference outputs.

A server runs in its own session (process group), so teardown can always kill every process it started,
whatever state a failed test left it in.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psutil
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARGS = ["--device", "cpu", "--dtype", "float32", "--max-total-tokens", "32768", "--log-level", "info"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LONG_CONTEXT = 16384  # tokens: a request this long runs for seconds, even on the tiny model


def tiny_checkpoint(tmp_path_factory: Any, long: bool = False) -> str:
    """A tiny random Llama checkpoint, built once per test session and shared by the server test modules.
    `long`: a context of LONG_CONTEXT tokens, for requests that must outlast a timeout or a disconnect."""
    from checkpoints import build_checkpoint

    path = tmp_path_factory.getbasetemp() / ("server-ckpt-long" if long else "server-ckpt")
    if not (path / "model.safetensors").exists():
        build_checkpoint(str(path), "llama", **({"max_position_embeddings": LONG_CONTEXT} if long else {}))
    return str(path)


def minisgl_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess that must run this checkout's minisgl."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: str
    api_key: str = "none"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def client(self, **kw: Any):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, max_retries=0, timeout=120, **kw)

    def async_client(self, **kw: Any):
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, max_retries=0, timeout=120, **kw)

    def post(
        self, path: str, json: Any = None, content: bytes | None = None, headers: dict | None = None
    ) -> httpx.Response:
        h = {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json", **(headers or {})}
        return httpx.post(f"{self.url}{path}", json=json, content=content, headers=h, timeout=120)

    def metrics(self) -> dict[str, float]:
        """`minisgl:` samples of /metrics, by name (labels dropped; there is only model_name)."""
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {self.api_key}"}).text
        out = {}
        for line in text.splitlines():
            m = re.match(r"(minisgl:[a-z_]+)(\{[^}]*\})? (\S+)$", line)
            if m and 'le="' not in (m.group(2) or ""):
                out[m.group(1)] = float(m.group(3))
        return out

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def child(self, comm: str) -> psutil.Process:
        """The serving process whose OS name is `comm` (minisgl-sched, minisgl-tok, minisgl-api)."""
        return next(p for p in psutil.Process(self.proc.pid).children() if p.name() == comm)

    def kill(self) -> None:
        """Kill the whole process group, and anything that left it."""
        procs = self.descendants()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=30)


def start_server(args: list[str], log_path: str, api_key: str | None = None, timeout: float = 180) -> Server:
    """Launch `python -m minisgl ARGS --port P` and wait until /health answers (the model is loaded)."""
    port = free_port()
    cmd = [sys.executable, "-m", "minisgl", *args, "--port", str(port)]
    if api_key:
        cmd += ["--api-key", api_key]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=minisgl_env(), cwd=REPO, start_new_session=True
        )
    server = Server(proc, port, log_path, api_key or "none")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.log()[-4000:]}")


def serve(tmp_path_factory: Any, name: str, args: list[str], **kwargs: Any) -> Iterator[Server]:
    """Body of a module-scoped server fixture (`yield from serve(...)`): start the server with its log in a fresh
    temp dir named `name`, hand it out, and kill it and its children afterwards."""
    server = start_server(args, str(tmp_path_factory.mktemp(name) / "server.log"), **kwargs)
    try:
        yield server
    finally:
        server.kill()


def wait_for(cond: Any, timeout: float, interval: float = 0.1) -> bool:
    """Poll `cond()` until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes of `procs` still alive (zombies count as gone) after up to `timeout` seconds."""

    def alive() -> list[psutil.Process]:
        out = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    wait_for(lambda: not alive(), timeout)
    return alive()


# ---- independent references: transformers on the same weights ----------------------------------------------
def chat_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """The prompt of a chat request as transformers tokenizes it."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


@torch.no_grad()
def hf_greedy(hf: Any, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """n greedy tokens (EOS ignored) and the log-softmax over the vocabulary at each step, float32."""
    ids = list(prompt)
    tokens, logprobs = [], []
    for _ in range(n):
        logits = hf(torch.tensor([ids])).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1)
        tok = int(lp.argmax())
        tokens.append(tok)
        logprobs.append(lp)
        ids.append(tok)
    return tokens, logprobs
