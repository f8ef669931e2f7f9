"""Per-token time of all linear layers (projections + LM head) of a model on CPU, for each quantization scheme.

    python benchmark/quant_linears_cpu.py                       # the embedded default model (SmolLM2-135M GGUF)
    python benchmark/quant_linears_cpu.py --tokens 1 16
    python benchmark/quant_linears_cpu.py --tokens 1024 --repeats 5 --cases "bf16 dense" int8 int4

Each layer of the loaded model is called on a [tokens, in_features] activation in the model's dtype, exactly as
the forward pass calls it; the figure is the median over repeats of the sum over layers, the LM head apart.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minisgl import LLM
from minisgl.layers.linear import Linear, LMHead

CASES = [  # (label, dtype, quantization)
    ("fp32 dense", "float32", "none"),
    ("bf16 dense", "bfloat16", "none"),
    ("int8", "bfloat16", "int8"),
    ("int4", "bfloat16", "int4"),
    ("gguf own bits", "bfloat16", None),
]


@torch.no_grad()
def time_layers(layers: list[torch.nn.Module], dim: int, dtype: torch.dtype, tokens: int, repeats: int) -> float:
    inputs = [torch.randn(tokens, m.in_features if isinstance(m, Linear) else dim, dtype=dtype) for m in layers]
    for m, x in zip(layers, inputs):
        m(x)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for m, x in zip(layers, inputs):
            m(x)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--cases", nargs="+", default=[c[0] for c in CASES], help="labels of CASES to run")
    args = ap.parse_args()
    for label, dtype, quantization in CASES:
        if label not in args.cases:
            continue
        llm = LLM(args.model, device="cpu", dtype=dtype, quantization=quantization, max_total_tokens=256)
        model, dtype = llm.scheduler.engine.model, llm.scheduler.engine.dtype
        heads = [m for m in model.modules() if isinstance(m, LMHead)]
        projs = [m for m in model.modules() if isinstance(m, Linear) and all(m is not h.proj for h in heads)]
        head_kind = heads[0].method.name if heads[0].method is not None else str(dtype).removeprefix("torch.")
        cells = []
        for t in args.tokens:
            proj = time_layers(projs, model.config.hidden_size, dtype, t, args.repeats)
            head = time_layers(heads, model.config.hidden_size, dtype, t, args.repeats)
            cells.append(f"M={t}: projections {proj * 1000:6.2f} ms + LM head ({head_kind}) {head * 1000:6.2f} ms")
        print(f"{label:14s} " + "  ".join(cells), flush=True)
        del llm


if __name__ == "__main__":
    main()
