"""The cost of constrained decoding: output tok/s of a concurrent batch with and without a JSON schema.

    python benchmark/structured.py                      # default model on the CPU, 16 requests
    python benchmark/structured.py --device cuda --model benchmark/configs/qwen3-0.6b --load-format dummy \
        --tokenizer PATH_TO_A_TOKENIZER --batch 64

Both runs sample at temperature 1 from the same prompts for exactly --max-tokens tokens each: the schema asks
for more items than fit (minItems), so no constrained request ends early, and the unconstrained ones ignore
EOS. The grammar is compiled before timing (the compile cache then serves it). Reports the median of --repeat
runs of each, interleaved so drift on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from minisgl import LLM, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "notes": {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 64},
    },
    "required": ["title", "rating", "notes"],
    "additionalProperties": False,
}


def prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, min(vocab, 10000)) for _ in range(rng.randint(100, 120))] for _ in range(n)]


def run(llm: LLM, batch: list[list[int]], params: SamplingParams) -> float:
    start = time.perf_counter()
    outs = llm.generate(batch, params)
    elapsed = time.perf_counter() - start
    tokens = [len(o.token_ids) for o in outs]
    assert all(t == params.max_tokens for t in tokens), f"a request ended early: {tokens}"
    return sum(tokens) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M GGUF")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--grammar-backend", default="xgrammar")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    llm = LLM(
        args.model,
        tokenizer=args.tokenizer,
        device=args.device,
        load_format=args.load_format,
        grammar_backend=args.grammar_backend,
        max_total_tokens=args.batch * 256 + 4096,
        max_running_requests=max(args.batch, 16),
        disable_radix_cache=True,
    )  # both runs prefill alike
    vocab = llm.scheduler.vocab_size
    free = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True, seed=1)
    constrained = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, seed=1, json_schema=json.dumps(SCHEMA))
    start = time.perf_counter()
    llm.generate(prompts(2, vocab, 0), SamplingParams(max_tokens=8, json_schema=constrained.json_schema))
    print(f"warm-up incl. grammar backend + schema compile: {time.perf_counter() - start:.2f}s")
    rates: dict[str, list[float]] = {"unconstrained": [], "json_schema": []}
    for i in range(args.repeat):
        batch = prompts(args.batch, vocab, 1 + i)
        rates["unconstrained"].append(run(llm, batch, free))
        rates["json_schema"].append(run(llm, batch, constrained))
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k, v in rates.items():
        print(
            f"{k:>14}: {med[k]:.1f} output tok/s ({args.batch} x {args.max_tokens}; runs "
            f"{', '.join(f'{x:.1f}' for x in v)})"
        )
    print(f"constrained / unconstrained: {med['json_schema'] / med['unconstrained']:.3f}")


if __name__ == "__main__":
    main()
