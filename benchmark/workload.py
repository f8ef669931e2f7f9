"""The standard offline workload, shared by our benchmark and the transformers baseline."""

from __future__ import annotations

import random


def offline_workload(num_prompts: int = 256, lo: int = 100, hi: int = 1024, seed: int = 0):
    """Prompt lengths and output lengths uniform in [lo, hi]; token ids uniform in [0, 10000]."""
    random.seed(seed)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(lo, hi))] for _ in range(num_prompts)]
    out_lens = [random.randint(lo, hi) for _ in range(num_prompts)]
    return prompts, out_lens
