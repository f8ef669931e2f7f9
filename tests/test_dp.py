"""`--dp 2`: two replicas of the default model behind sglang-router (cache-aware) on the CPU.

The router serves the OpenAI and native endpoints and streams; requests that share a long prefix go to the
replica that holds it (hit rate, from each replica's /metrics, far above the same trace under round-robin);
a replica's death takes the whole server down cleanly, as documented in docs/serving.md.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import threading

import httpx
import psutil
import pytest
from server_util import free_port, minisgl_env, serve, wait_for, wait_gone

from minisgl.server import dataparallel
from minisgl.server.args import parse_args

pytestmark = pytest.mark.slow
pytest.importorskip("sglang_router")

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ["--device", "cpu", "--max-total-tokens", "4096", "--dp", "2"]
    yield from serve(tmp_path_factory, "server-dp", args, timeout=300)


def urls(server) -> list[str]:
    """The replicas' own URLs, from the launcher's log."""
    found = dict(re.findall(r"replica (\d+): (http://127\.0\.0\.1:\d+)", server.log()))
    return [found[str(i)] for i in range(len(found))]


def counters(url: str) -> dict[str, float]:
    """prompt and cached token counters of one replica, and its dp_rank label."""
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        m = re.match(r'minisgl:(prompt_tokens|cached_tokens)_total\{.*dp_rank="(\d+)".*\} (\S+)$', line)
        if m:
            out[m.group(1)] = float(m.group(3))
            out["dp_rank"] = int(m.group(2))
    return out


def model_name(server) -> str:
    return httpx.get(f"{urls(server)[0]}/v1/models").json()["data"][0]["id"]


def test_router_serves_openai_and_native_endpoints(server):
    name = model_name(server)
    texts = set()
    for _ in range(4):  # whichever replica serves it, the greedy text is the same
        r = server.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        texts.add(r.json()["choices"][0]["text"])
    assert len(texts) == 1
    native = server.post("/generate", json={"text": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 8}})
    assert native.status_code == 200, native.text
    assert native.json()["text"] in texts
    chat = server.client().chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert chat.choices[0].message.content

    # streams, through the router
    stream = server.client().completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) in texts
    events = []
    with httpx.stream(
        "POST",
        f"{server.url}/generate",
        timeout=60,
        json={"text": PROMPT, "stream": True, "sampling_params": {"temperature": 0, "max_new_tokens": 8}},
    ) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 2
    assert json.loads(events[-2])["text"] in texts

    # a bad request is refused by the replica with its error body, through the router
    bad = server.post("/generate", json={"text": "a", "sampling_params": {"temperature": -1}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"


def test_replicas_are_labelled_in_metrics_and_log(server):
    assert [counters(u)["dp_rank"] for u in urls(server)] == [0, 1]
    log = server.log()
    assert "dp0.scheduler" in log and "dp1.scheduler" in log and "behind sglang-router" in log
    assert [httpx.get(f"{u}/get_server_info").json()["dp_rank"] for u in urls(server)] == [0, 1]


def _prefix_trace(seed: int) -> list[str]:
    """Pairs of prompts: a long, distinct shared prefix each, then a short question."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta river mountain city garden music paper window light stone cloud".split()
    prompts = []
    for i in range(6):
        prefix = f"Document {i}. " + " ".join(rng.choice(words) for _ in range(60))
        prompts += [f"{prefix}\nQuestion {q}: summarise document {i}." for q in range(2)]
    return prompts


def _hit_rate(router_url: str, replicas: list[str], prompts: list[str]) -> float:
    for u in replicas:
        assert httpx.post(f"{u}/flush_cache").status_code == 200
    before = [counters(u) for u in replicas]
    for p in prompts:
        r = httpx.post(f"{router_url}/generate", json={"text": p, "sampling_params": {"max_new_tokens": 1}}, timeout=60)
        assert r.status_code == 200, r.text
    after = [counters(u) for u in replicas]
    cached = sum(a["cached_tokens"] - b["cached_tokens"] for a, b in zip(after, before))
    prompt = sum(a["prompt_tokens"] - b["prompt_tokens"] for a, b in zip(after, before))
    return cached / prompt


def test_cache_aware_routing_beats_round_robin(server, tmp_path):
    replicas = urls(server)
    aware = _hit_rate(server.url, replicas, _prefix_trace(0))

    # the same replicas registered with a second router run by hand, round-robin (docs/serving.md)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "sglang_router.launch_router",
        "--worker-urls",
        *replicas,
        "--policy",
        "round_robin",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prometheus-port",
        str(free_port()),
        "--log-level",
        "warn",
        "--worker-startup-check-interval",
        "1",
    ]
    with open(tmp_path / "router.log", "w") as log:
        # dies with this process even if the test is killed (no orphan router)
        router = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=minisgl_env(), preexec_fn=dataparallel._router_child_setup
        )
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(ready, 60), (tmp_path / "router.log").read_text()
        rr = _hit_rate(f"http://127.0.0.1:{port}", replicas, _prefix_trace(1))
    finally:
        router.terminate()
        router.wait(timeout=30)
    print(f"prefix-cache hit rate: cache_aware {aware:.3f}, round_robin {rr:.3f}")
    assert aware > 0.3 and aware > rr + 0.25, (aware, rr)


def test_killing_a_replica_fails_requests_cleanly_and_tears_everything_down(server):
    """Documented behaviour: a replica's death ends the whole server (exit status 1), like any child's; the
    in-flight request gets an error, not a hang, and no process survives."""
    procs = server.descendants()
    names = {p.name() for p in procs}
    assert {"minisgl-sched0", "minisgl-sched1", "minisgl-api0", "minisgl-api1"} <= names
    outcome = {}

    def stream() -> None:
        try:
            with httpx.stream(
                "POST",
                f"{server.url}/generate",
                timeout=60,
                json={
                    "text": "Tell me a long story",
                    "stream": True,
                    "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True},
                },
            ) as r:
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                outcome["done"] = bool(lines) and lines[-1] == "data: [DONE]"
                outcome["status"] = r.status_code
        except httpx.HTTPError as e:
            outcome["error"] = e

    t = threading.Thread(target=stream)
    t.start()
    assert wait_for(lambda: any(_running(u) for u in urls(server)), 30)
    victim = next(p for p in procs if p.name() == "minisgl-sched1")
    victim.kill()
    assert server.proc.wait(timeout=60) == 1
    t.join(timeout=60)
    assert not t.is_alive()
    assert "error" in outcome or outcome.get("status") != 200 or not outcome.get("done"), outcome
    assert wait_gone(procs, 15) == []
    assert "dp1.scheduler process died" in server.log()


def _running(url: str) -> bool:
    m = re.search(r"minisgl:num_running_reqs\{[^}]*\} (\S+)", httpx.get(f"{url}/metrics").text)
    return bool(m) and float(m.group(1)) >= 1


def test_dp_without_the_router_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(dataparallel.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"minisgl\[router\]"):
        dataparallel.check_router_installed()


def test_cpu_cores_are_split_between_replicas():
    cores = sorted(psutil.Process().cpu_affinity())
    dp = min(2, len(cores))
    plan = dataparallel.plan_replicas(parse_args(["--device", "cpu", "--dp", str(dp)]))
    assert sorted(c for r in plan for c in r.cpus) == cores
    assert all(r.env["OMP_NUM_THREADS"] == str(len(r.cpus)) for r in plan)
    assert len({r.port for r in plan}) == dp and [r.args.dp_rank for r in plan] == list(range(dp))
