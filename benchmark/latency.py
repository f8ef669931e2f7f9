"""Batch-1 latency: time to first token for a 1024-token prompt, then decode tokens per second.

python benchmark/latency.py --model benchmark/configs/qwen3-0.6b --load-format dummy
python benchmark/latency.py --profile 32   # then a torch.profiler table of the kernels of 32 decode steps
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import statistics
import tempfile
import time

from minisgl import LLM, SamplingParams


def measure(llm: LLM, prompt_len: int, decode_tokens: int, vocab: int, seed: int = 0) -> tuple[float, float]:
    """(TTFT seconds, decode tok/s). Fresh random prompts each time so the prefix cache cannot help."""
    rng = random.Random(seed)

    def prompt() -> list[int]:
        return [rng.randrange(10, min(vocab, 10000)) for _ in range(prompt_len)]

    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    many = SamplingParams(temperature=0, max_tokens=decode_tokens + 1, ignore_eos=True)
    llm.generate([prompt()], many)  # warm-up (and CUDA-graph capture, compilation)

    def timed(params: SamplingParams) -> float:
        start = time.perf_counter()
        llm.generate([prompt()], params)
        return time.perf_counter() - start

    # The decode rate is (N + 1 tokens - 1 token) over separate requests, so a slow prefill in either moves it:
    # a single outlier once turned 300 tok/s into 432, and TTFTs of one H100 run spread over 22-50 ms, which
    # moved the 8B's fp8 figure between 253 and 277 tok/s. Medians of several of each keep that out.
    ttft = statistics.median(timed(one) for _ in range(5))
    total = statistics.median(timed(many) for _ in range(3))
    return ttft, decode_tokens / (total - ttft)


def profile(llm: LLM, prompt_len: int, decode_tokens: int, vocab: int) -> None:
    """Print where the time of `decode_tokens` steps after a prompt goes, kernel by kernel (CUDA graphs
    included: the profiler sees the kernels a graph replay launches)."""
    import torch
    from torch.profiler import ProfilerActivity

    rng = random.Random(1)
    prompt = [rng.randrange(10, min(vocab, 10000)) for _ in range(prompt_len)]
    params = SamplingParams(temperature=0, max_tokens=decode_tokens + 1, ignore_eos=True)
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        llm.generate([prompt], params)
        wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events)
    print(
        f"profile: {decode_tokens} decode steps after a {prompt_len}-token prompt, {wall * 1e3:.1f} ms wall, "
        f"kernels {total / 1e3:.1f} ms; per kernel: total ms, calls, mean us"
    )
    for e in events[:30]:
        print(f"  {e.device_time_total / 1e3:8.2f} {e.count:6d} {e.device_time_total / e.count:8.1f}  {e.key[:100]}")
    # One kernel serves several shapes (the GEMVs of qkv, o, gate_up, down): the trace's launch grids tell them
    # apart.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    by_grid: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for ev in trace.get("traceEvents", []):
        if ev.get("cat") == "kernel":
            by_grid[(ev["name"][:60], str(ev.get("args", {}).get("grid")))].append(ev.get("dur", 0.0))
    print("per kernel and grid: total ms, calls, mean us")
    for (name, grid), durs in sorted(by_grid.items(), key=lambda kv: -sum(kv[1]))[:20]:
        print(f"  {sum(durs) / 1e3:8.2f} {len(durs):6d} {sum(durs) / len(durs):8.1f}  {name} grid={grid}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="benchmark/configs/qwen3-0.6b")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--attention-backend", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--quantization", default=None, help="none | int8 | int4 | fp8 (default: the checkpoint's own)")
    ap.add_argument("--quantize-lm-head", action="store_true")
    ap.add_argument("--cuda-graph-max-bs", type=int, default=None, help="capture fewer decode graphs (batch 1 needs 1)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS", help="then profile this many decode steps")
    args = ap.parse_args()
    llm = LLM(
        args.model,
        skip_tokenizer_init=True,
        load_format=args.load_format,
        attention_backend=args.attention_backend,
        dtype=args.dtype,
        device=args.device,
        max_total_tokens=8 * (args.prompt_len + args.decode_tokens + 64),
        quantization=args.quantization,
        quantize_lm_head=args.quantize_lm_head,
        **({"cuda_graph_max_bs": args.cuda_graph_max_bs} if args.cuda_graph_max_bs else {}),
    )
    ttft, tps = measure(llm, args.prompt_len, args.decode_tokens, llm.scheduler.vocab_size)
    engine = llm.scheduler.engine
    scheme = engine.quant.scheme if engine.quant else "none"
    print(f"model={args.model} dtype={engine.dtype} quantization={scheme} device={engine.device}")
    print(f"TTFT ({args.prompt_len}-token prompt): {ttft * 1000:.1f} ms   batch-1 decode: {tps:.1f} tok/s")
    if args.profile:
        profile(llm, args.prompt_len, args.profile, llm.scheduler.vocab_size)


if __name__ == "__main__":
    main()
