"""Host cost of constrained decoding alone, without a model: one step's `advance` of minisgl's xgrammar backend
(accept each row's token, fill the mask of the next, on --threads threads) for a batch of matchers of
benchmark/structured.py's JSON schema, stepping through random allowed tokens, beside the same work done one
matcher at a time on one thread.

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
from structured import SCHEMA
from transformers import AutoTokenizer

from minisgl.grammar import GrammarSpec, bitmask_width, create_backend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--vocab", type=int, default=None, help="the model's vocabulary size (default: the tokenizer's)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="advance's threads (default: the backend's own)")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab = args.vocab or len(tok)
    backend = create_backend("xgrammar", tok, vocab, [tok.eos_token_id])
    if args.threads:
        backend._threads = args.threads
    compiled = backend.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    matchers = [backend.matcher(compiled) for _ in range(args.batch)]
    copies = [backend.matcher(compiled) for _ in range(args.batch)]  # the same tokens, accepted one by one
    rows = list(range(args.batch))
    bitmask = torch.empty(args.batch, bitmask_width(vocab), dtype=torch.int32)
    spare = torch.empty_like(bitmask)
    rng = random.Random(0)
    backend.fill_masks(matchers, bitmask, rows)
    batched = single = 0.0
    for _ in range(args.steps):
        tokens = []
        for row in bitmask:
            word = rng.choice(torch.nonzero(row).flatten().tolist())
            bits = int(row[word]) & 0xFFFFFFFF
            tokens.append(word * 32 + rng.choice([b for b in range(32) if bits >> b & 1]))
        start = time.perf_counter()
        assert all(backend.advance(matchers, tokens, bitmask, rows))
        batched += time.perf_counter() - start
        start = time.perf_counter()
        for row, (m, t) in enumerate(zip(copies, tokens)):
            m.accept(t)
            m.fill_mask(spare, row)
        single += time.perf_counter() - start
    ms = 1e3 / args.steps
    print(f"vocabulary {vocab}, {args.batch} matchers, {args.steps} steps: advance {batched * ms:.2f} ms a step "
          f"on {backend._threads} threads ({single * ms:.2f} one matcher at a time)")  # fmt: skip


if __name__ == "__main__":
    main()
