"""A decode step's sampling on the CPU (engine/sampling.py's `sample`) over the default model's vocabulary, per
set of sampling parameters: as the engine runs it (top-k/top-p on CPU_SAMPLING_CANDIDATES candidates, the
Gumbel draw in native code), and in plain torch ops (whole-row sorts, the noise of every token), the same
draw.

    python benchmark/sampling_cpu.py --rows 1 16

Logits are a real-looking mix: a few strong candidates over a long flat tail (temperature-1 logits of an LLM).
Median milliseconds per call.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import timeit
import types

import torch

import minisgl.engine.sampling as sampling
import minisgl.engine.token_filter as token_filter
from minisgl import SamplingParams

PARAMS = {
    "greedy": SamplingParams(temperature=0.0),
    "temperature 1": SamplingParams(temperature=1.0),
    "t 0.7, top_p 0.9": SamplingParams(temperature=0.7, top_p=0.9),
    "t 0.7, top_k 40": SamplingParams(temperature=0.7, top_k=40),
    "t 0.7, top_k 40, top_p 0.95": SamplingParams(temperature=0.7, top_k=40, top_p=0.95),
}


@contextlib.contextmanager
def torch_ops_only(vocab: int):
    saved = token_filter.CPU_SAMPLING_CANDIDATES, sampling.native
    token_filter.CPU_SAMPLING_CANDIDATES = vocab
    sampling.native = types.SimpleNamespace(fits=lambda *t: False)
    try:
        yield
    finally:
        token_filter.CPU_SAMPLING_CANDIDATES, sampling.native = saved


def median_ms(fn, repeats: int) -> float:
    fn()
    return statistics.median(timeit.repeat(fn, number=1, repeat=repeats)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, vocabulary {args.vocab}")
    for rows in args.rows:
        logits = torch.randn(rows, args.vocab, generator=gen) * 2
        logits[:, :50] += torch.randn(rows, 50, generator=gen) * 3 + 8  # the few likely next tokens
        for name, p in PARAMS.items():
            batch = sampling.SamplingBatch.build(
                [p] * rows, list(range(rows)), [0] * rows, [[1]] * rows, [[]] * rows, args.vocab, logits.device
            )
            now = median_ms(lambda: sampling.sample(logits, batch), args.repeats)
            with torch_ops_only(args.vocab):
                plain = median_ms(lambda: sampling.sample(logits, batch), args.repeats)
            print(f"  {rows:3d} rows  {name:28s}  {now:7.2f} ms   torch ops {plain:7.2f} ms", flush=True)


if __name__ == "__main__":
    main()
