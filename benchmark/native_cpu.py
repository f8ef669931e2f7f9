"""The native AVX-512 int4/int8 matmuls (minisgl/kernels/csrc) against torch's packed CPU kernels, on the
default model's layer shapes (SmolLM2-135M: hidden 576, intermediate 1536, vocabulary 49152).

    python benchmark/native_cpu.py
    python benchmark/native_cpu.py --rows 1 16 --repeats 500

Random weights in each kernel's own layout (int4: torch's packed layout, which both kernels read; int8: [N, K]
with per-row scales), bf16 activations. Median microseconds per call over --repeats, weights hot in cache
(the same weight is multiplied every call), so this compares the kernels' compute, not memory streaming.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minisgl.kernels import native
from minisgl.layers.linear import Linear
from minisgl.quant import QuantConfig, make_method

INT4_SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
INT8_SHAPES = {"lm_head": (49152, 576)}


def median_us(fn, repeats: int) -> float:
    for _ in range(max(3, repeats // 10)):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def int4_layer(rows: int, cols: int) -> Linear:
    layer = Linear(cols, rows, quant=QuantConfig("int4"))
    layer.create_weights(make_method("int4", torch.device("cpu"), torch.bfloat16))
    layer.write_rows(0, torch.randn(rows, cols) * 0.05)
    layer.finalize()
    return layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 7, 16])
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    if not native.has_avx512():
        raise SystemExit("the native AVX-512 kernels did not build here")
    torch.manual_seed(0)
    print(f"{'kernel':8s} {'shape':>12s} {'rows':>4s} {'torch us':>9s} {'native us':>9s}")
    for name, (n, k) in INT4_SHAPES.items():
        layer = int4_layer(n, k)
        for m in args.rows:
            x = torch.randn(m, k).to(torch.bfloat16)
            ref = median_us(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.qweight, 32, layer.qscale_zero),
                            args.repeats)  # fmt: skip
            ours = median_us(lambda: native.int4_gemm(x, layer.qweight, layer.qscale_zero, n), args.repeats)
            print(f"int4 {name:>8s} {n:>5d}x{k:<5d} {m:4d} {ref:9.1f} {ours:9.1f}", flush=True)
    for name, (n, k) in INT8_SHAPES.items():
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scale = (torch.rand(n) * 0.01).to(torch.bfloat16)
        for m in args.rows:
            x = torch.randn(m, k).to(torch.bfloat16)
            repeats = max(10, args.repeats // 10)
            ref = median_us(lambda: torch.ops.aten._weight_int8pack_mm(x, w, scale), repeats)
            ours = median_us(lambda: native.int8_gemm(x, w, scale), repeats)
            print(f"int8 {name:>8s} {n:>5d}x{k:<5d} {m:4d} {ref:9.1f} {ours:9.1f}", flush=True)


if __name__ == "__main__":
    main()
