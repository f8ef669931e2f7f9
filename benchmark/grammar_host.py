"""Host cost of constrained decoding alone, without a model: xgrammar's batch mask fill and token accepts for a
batch of matchers of benchmark/structured.py's JSON schema, stepping through random allowed tokens.

    python benchmark/grammar_host.py --tokenizer PATH_TO_A_TOKENIZER --vocab 151936 --batch 64

Compare its per-step figures with a profile of `benchmark/structured.py` to see how much the engine's process
itself slows the grammar work.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
import xgrammar as xgr
from structured import SCHEMA
from transformers import AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--vocab", type=int, default=None, help="the model's vocabulary size (default: the tokenizer's)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab = args.vocab or len(tok)
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)).compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False
    )
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(args.batch)]
    bitmask = xgr.allocate_token_bitmask(args.batch, vocab)
    batch = xgr.BatchGrammarMatcher(max_threads="auto")
    rng = random.Random(0)
    fill = accept = batch_accept = 0.0
    for _ in range(args.steps):
        start = time.perf_counter()
        batch.batch_fill_next_token_bitmask(matchers, bitmask, list(range(args.batch)))
        fill += time.perf_counter() - start
        tokens = []
        for row in bitmask:
            word = rng.choice(torch.nonzero(row).flatten().tolist())
            bits = int(row[word]) & 0xFFFFFFFF
            tokens.append(word * 32 + rng.choice([b for b in range(32) if bits >> b & 1]))
        # the same tokens on copies of the matchers, accepted one call for the batch
        copies = [m.fork() for m in matchers] if hasattr(matchers[0], "fork") else None
        start = time.perf_counter()
        for m, t in zip(matchers, tokens):
            m.accept_token(t)
        accept += time.perf_counter() - start
        if copies is not None:
            start = time.perf_counter()
            xgr.BatchGrammarMatcher.batch_accept_token(copies, tokens)
            batch_accept += time.perf_counter() - start
    per_token, fill_ms = 1e6 / args.steps / args.batch, 1e3 * fill / args.steps
    print(f"vocabulary {vocab}, {args.batch} matchers, {args.steps} steps: batch mask fill {fill_ms:.2f} ms a step, "
          f"accept {accept * per_token:.1f} us a token one by one, {batch_accept * per_token:.1f} in one "
          "batch_accept_token call")  # fmt: skip


if __name__ == "__main__":
    main()
