"""Time of one decode step's forward (Engine.forward) on CPU, apart from scheduling and sampling.

    python benchmark/cpu_step.py                          # default model, batches 1 and 16
    python benchmark/cpu_step.py --quantization none --batch 1 4 16

For each batch size: that many ~110-token prompts, 128 greedy tokens each, decoding together; reports the mean
forward time of the decode steps and the rest of the step (scheduler, sampling) per step.
"""

from __future__ import annotations

import argparse
import random
import time

from minisgl import LLM, SamplingParams
from minisgl.engine.engine import Engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()
    llm = LLM(args.model, device="cpu", quantization=args.quantization, max_total_tokens=16384)
    vocab = llm.scheduler.vocab_size
    timing = {"seconds": 0.0, "steps": 0}
    forward = Engine.forward

    def timed_forward(self, batch):
        start = time.perf_counter()
        out = forward(self, batch)
        if batch.is_decode:
            timing["seconds"] += time.perf_counter() - start
            timing["steps"] += 1
        return out

    Engine.forward = timed_forward
    rng = random.Random(0)
    for b in args.batch:
        prompts = [[rng.randrange(10, vocab) for _ in range(110)] for _ in range(b)]
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
        timing.update(seconds=0.0, steps=0)
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=129, ignore_eos=True))
        total = time.perf_counter() - start
        fwd = timing["seconds"] / timing["steps"]
        rest = (total - timing["seconds"]) / timing["steps"]
        print(f"batch {b:3d}: decode forward {fwd * 1000:6.2f} ms/step, other {rest * 1000:5.2f} ms/step "
              f"(prefill included) over {timing['steps']} steps")  # fmt: skip


if __name__ == "__main__":
    main()
