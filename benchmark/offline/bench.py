"""Offline throughput: 256 requests, prompt and output lengths uniform in [100, 1024], temperature 0.6.

python benchmark/offline/bench.py --model benchmark/configs/qwen3-0.6b --load-format dummy
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from workload import offline_workload  # noqa: E402

from minisgl import LLM, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="benchmark/configs/qwen3-0.6b")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=1024, help="upper bound of prompt and output lengths")
    ap.add_argument("--attention-backend", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--page-size", type=int, default=1)
    ap.add_argument("--max-running-requests", type=int, default=256)
    ap.add_argument("--chunked-prefill-size", type=int, default=8192)
    ap.add_argument("--max-total-tokens", type=int, default=None)
    ap.add_argument("--cuda-graph-max-bs", type=int, default=256)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--quantization", default=None, help="none | int8 | int4 | fp8 (default: the checkpoint's own)")
    args = ap.parse_args()

    prompts, out_lens = offline_workload(args.num_prompts, 100, args.max_len)
    llm = LLM(
        args.model,
        skip_tokenizer_init=True,
        load_format=args.load_format,
        attention_backend=args.attention_backend,
        dtype=args.dtype,
        device=args.device,
        page_size=args.page_size,
        max_running_requests=args.max_running_requests,
        chunked_prefill_size=args.chunked_prefill_size,
        max_total_tokens=args.max_total_tokens,
        cuda_graph_max_bs=args.cuda_graph_max_bs,
        tp_size=args.tp,
        quantization=args.quantization,
    )
    params = [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True) for n in out_lens]
    llm.generate([p[:100] for p in prompts[:8]], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    assert tokens == sum(out_lens), "every request must produce exactly its asked length"
    quant = llm.scheduler.engine.quant
    backend = type(llm.scheduler.engine.attn_backend).__name__
    print(f"model={args.model} backend={backend} quantization={quant.scheme if quant else 'none'}")
    print(f"output tokens: {tokens}  seconds: {seconds:.2f}  output tok/s: {tokens / seconds:.1f}")


if __name__ == "__main__":
    main()
