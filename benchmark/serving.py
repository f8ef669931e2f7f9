"""Online serving benchmark: a Poisson arrival trace of prompts sharing a few system prompts, streamed over
SGLang's native /generate; reports throughput, time to first token, inter-token latency and end-to-end latency
percentiles, and the prefix-cache hit rate the server reported.

Against a running server (one minisgl, a --dp router, or any SGLang-compatible server):
    python benchmark/serving.py --url http://127.0.0.1:30000 --num-prompts 200 --request-rate 4
Or let it start (and stop) `python -m minisgl --dp N` with extra server flags:
    python benchmark/serving.py --dp 2 --server-args "--device cpu" --num-prompts 200 --request-rate 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

WORDS = (
    "the of and to in is was for on that with as by at from his her an which this are had not be or but "
    "river mountain city garden music paper window light stone cloud engine market story letter bridge"
).split()


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)  # seconds per token between successive chunks


def build_trace(args: argparse.Namespace) -> list[tuple[float, str]]:
    """(arrival offset in seconds, prompt): a system prompt drawn from a few, then a distinct question."""
    rng = random.Random(args.seed)
    systems = [
        f"System prompt {k}: " + " ".join(rng.choice(WORDS) for _ in range(args.system_prompt_len))
        for k in range(args.num_system_prompts)
    ]
    t, trace = 0.0, []
    for i in range(args.num_prompts):
        question = " ".join(rng.choice(WORDS) for _ in range(args.question_len))
        trace.append((t, f"{rng.choice(systems)}\nUser {i}: {question}\nAssistant:"))
        t += rng.expovariate(args.request_rate) if args.request_rate != float("inf") else 0.0
    return trace


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, output_len: int) -> Result:
    body = {
        "text": prompt,
        "stream": True,
        "sampling_params": {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True},
    }
    res = Result()
    start = last = time.perf_counter()
    tokens = 0
    try:
        async with client.stream("POST", f"{url}/generate", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error")
                    return res
                meta = chunk["meta_info"]
                now = time.perf_counter()
                new = meta["completion_tokens"] - tokens
                if new > 0:
                    if tokens == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append((now - last) / new)
                    tokens, last = meta["completion_tokens"], now
                res.prompt_tokens, res.cached_tokens = meta["prompt_tokens"], meta.get("cached_tokens", 0)
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.ok, res.output_tokens, res.e2e = True, tokens, time.perf_counter() - start
    return res


async def run_trace(
    url: str, trace: list[tuple[float, str]], output_len: int, max_concurrency: int | None
) -> tuple[list[Result], float]:
    limits = httpx.Limits(max_connections=max_concurrency or 1000, max_keepalive_connections=100)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        start = time.perf_counter()

        async def fire(offset: float, prompt: str) -> Result:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            if sem is None:
                return await one_request(client, url, prompt, output_len)
            async with sem:
                return await one_request(client, url, prompt, output_len)

        results = await asyncio.gather(*(fire(t, p) for t, p in trace))
        return list(results), time.perf_counter() - start


def percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    xs = sorted(xs)

    def q(p: float) -> float:
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

    return {"mean": statistics.fmean(xs), "p50": q(50), "p90": q(90), "p99": q(99)}


def report(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "input_throughput": prompt_tokens / duration,
        "cache_hit_rate": sum(r.cached_tokens for r in ok) / max(1, prompt_tokens),
        "ttft_s": percentiles([r.ttft for r in ok]),
        "itl_s": percentiles([x for r in ok for x in r.itl]),
        "e2e_s": percentiles([r.e2e for r in ok]),
    }


def print_report(s: dict) -> None:
    print(f"completed {s['completed']}, failed {s['failed']} in {s['duration_s']:.1f}s")
    for e in s["errors"]:
        print(f"  error: {e}")
    print(
        f"request throughput {s['request_throughput']:.2f} req/s, output {s['output_throughput']:.1f} tok/s, "
        f"input {s['input_throughput']:.1f} tok/s, prefix-cache hit rate {100 * s['cache_hit_rate']:.1f}%"
    )
    for name, unit, scale in (("ttft_s", "ms", 1e3), ("itl_s", "ms", 1e3), ("e2e_s", "s", 1)):
        p = s[name]
        if p:
            print(
                f"{name[:-2].upper():5s} mean {p['mean'] * scale:9.1f} {unit}  p50 {p['p50'] * scale:9.1f}  "
                f"p90 {p['p90'] * scale:9.1f}  p99 {p['p99'] * scale:9.1f}"
            )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(dp: int, server_args: str, timeout: float) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "minisgl", "--dp", str(dp), "--port", str(port), *shlex.split(server_args)]
    print("starting:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise SystemExit(f"the server was not ready after {timeout:.0f}s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)  # the launcher tears its replicas and router down
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server; without it one is started with --dp and --server-args")
    p.add_argument("--dp", type=int, default=1, help="replicas of the server this script starts")
    p.add_argument("--server-args", default="", help="more flags for the server this script starts")
    p.add_argument("--server-timeout", type=float, default=600, help="seconds to wait for the started server")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument(
        "--request-rate", type=float, default=4.0, help="mean requests per second (Poisson arrivals); inf: all at once"
    )
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    p.add_argument("--num-system-prompts", type=int, default=4)
    p.add_argument("--system-prompt-len", type=int, default=300, help="words per system prompt")
    p.add_argument("--question-len", type=int, default=30, help="words per question")
    p.add_argument("--output-len", type=int, default=64, help="tokens generated per request (EOS ignored)")
    p.add_argument("--warmup", type=int, default=2, help="requests sent (one at a time) before the trace")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the summary to this file")
    args = p.parse_args()

    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.dp, args.server_args, args.server_timeout)
    try:
        trace = build_trace(args)
        warm = argparse.Namespace(
            **{**vars(args), "seed": args.seed + 1, "num_prompts": args.warmup, "request_rate": float("inf")}
        )
        for _, prompt in build_trace(warm):
            asyncio.run(run_trace(url, [(0.0, prompt)], 4, None))
        results, duration = asyncio.run(run_trace(url, trace, args.output_len, args.max_concurrency))
        summary = {"url": url, "dp": args.dp if proc else None, "args": vars(args), **report(results, duration)}
        print_report(summary)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
    finally:
        if proc is not None:
            stop_server(proc)


if __name__ == "__main__":
    main()
