"""CPU figures on the embedded default model (SmolLM2-135M-Instruct GGUF), beside transformers on the same file.

    python benchmark/cpu.py                 # minisgl, then transformers generate
    python benchmark/cpu.py --skip-hf       # minisgl only

Reports: load time, batch-1 TTFT and decode tok/s, and total output tok/s for 16 concurrent requests with
~110-token prompts and 128 new tokens each (minisgl: the median of --repeat runs, 3 by default).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

from minisgl import LLM, SamplingParams


def concurrent_prompts(n: int, vocab: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(rng.randint(100, 120))] for _ in range(n)]


def bench_minisgl(model: str | None, dtype: str, quantization: str | None, repeat: int) -> None:
    """Each figure is measured `repeat` times on fresh prompts (the prefix cache cannot help); the median is
    the result, the spread shows how noisy this shared 2-core machine is."""
    import latency

    start = time.perf_counter()
    llm = LLM(model, device="cpu", dtype=dtype, quantization=quantization, max_total_tokens=16384)
    print(f"[minisgl] load: {time.perf_counter() - start:.2f}s  dtype={llm.scheduler.engine.dtype}")
    vocab = llm.scheduler.vocab_size
    runs = [latency.measure(llm, 110, 128, vocab, seed=i) for i in range(repeat)]
    ttft, tps = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    spread = ", ".join(f"{r[1]:.1f}" for r in runs)
    print(f"[minisgl] batch-1: TTFT {ttft * 1000:.0f} ms, decode {tps:.1f} tok/s (median of {spread})")
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    llm.generate(concurrent_prompts(2, vocab, seed=0), SamplingParams(max_tokens=4, ignore_eos=True))
    rates = []
    for i in range(repeat):
        prompts = concurrent_prompts(16, vocab, seed=1 + i)
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        rates.append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start))
    spread = ", ".join(f"{r:.1f}" for r in rates)
    print(f"[minisgl] 16 concurrent x 128 tokens: {statistics.median(rates):.1f} output tok/s (median of {spread})")


def bench_hf(path: str) -> None:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    model = model.to(torch.float32).eval()
    print(f"[transformers] load: {time.perf_counter() - start:.2f}s")
    vocab = model.config.vocab_size
    with torch.inference_mode():
        ids = torch.tensor(concurrent_prompts(1, vocab))
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=33, min_new_tokens=33, do_sample=False)
        tps = 32 / (time.perf_counter() - start - ttft)
        print(f"[transformers] batch-1: TTFT {ttft * 1000:.0f} ms, decode {tps:.1f} tok/s")
        prompts = concurrent_prompts(16, vocab)
        width = max(map(len, prompts))
        batch = torch.zeros(16, width, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for i, p in enumerate(prompts):
            batch[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
        start = time.perf_counter()
        model.generate(batch, attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
        seconds = time.perf_counter() - start
        print(f"[transformers] 16 concurrent (32 new tokens each): {16 * 32 / seconds:.1f} output tok/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs per minisgl figure; the median is reported")
    args = ap.parse_args()
    bench_minisgl(args.model, args.dtype, args.quantization, args.repeat)
    if not args.skip_hf:
        from minisgl.models.hub import resolve_model_path

        bench_hf(resolve_model_path(args.model))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    main()
