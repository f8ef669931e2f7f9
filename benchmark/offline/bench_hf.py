"""The offline workload through transformers' generate (bf16, sdpa, padded batches): the newcomer's baseline.

python benchmark/offline/bench_hf.py --model benchmark/configs/qwen3-0.6b
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from workload import offline_workload  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="benchmark/configs/qwen3-0.6b")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(args.model)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    prompts, out_lens = offline_workload(args.num_prompts, 100, args.max_len)
    # Sort by length so padded batches waste less; generate each batch to its longest asked output.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = 0
    tokens = 0
    start = time.perf_counter()
    for b in range(0, len(order), args.batch_size):
        idx = order[b : b + args.batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):  # left padding, as decoder-only generate expects
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        new = max(out_lens[i] for i in idx)
        with torch.inference_mode():
            model.generate(
                input_ids=ids.to(args.device),
                attention_mask=mask.to(args.device),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=True,
                temperature=0.6,
                top_k=0,
                pad_token_id=pad,
            )
        tokens += sum(out_lens[i] for i in idx)  # useful tokens only: padding work is the baseline's cost
        # Progress per batch, so a run cut off by a time limit still shows the rate it was going at.
        elapsed = time.perf_counter() - start
        print(
            f"[transformers] batch {b // args.batch_size + 1}: {tokens} tokens in {elapsed:.1f}s "
            f"({tokens / elapsed:.1f} tok/s so far)",
            flush=True,
        )
    seconds = time.perf_counter() - start
    print(f"[transformers] output tokens: {tokens}  seconds: {seconds:.2f}  output tok/s: {tokens / seconds:.1f}")


if __name__ == "__main__":
    main()
