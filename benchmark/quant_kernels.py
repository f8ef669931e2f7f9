"""GPU quantized-linear kernels on Llama-3.1-8B's layer shapes: correctness against a float32 matmul with the
dequantized weights, and speed (triton.testing.do_bench median) of W8A16 / W4A16 / FP8 vs bf16 F.linear.

    python benchmark/quant_kernels.py                 # M = 1 16 64 256
    python benchmark/quant_kernels.py --m 1 --shapes qkv
    python benchmark/quant_kernels.py --m 1 --cudagraph   # time replays of a CUDA graph of the call
    python benchmark/quant_kernels.py --m 1 --cold        # replays with the weights out of L2, as in decode

Without --cudagraph, a call's time includes its host-side launch: a Triton launch from Python costs tens of
microseconds, as long as a small layer's kernel, so small-M figures then vary with the host. The engine's
decode steps replay CUDA graphs, which --cudagraph measures.

Weights are quantized through the same methods the model uses (minisgl/quant), so what is timed is the layer's
own `apply`. GB/s counts the bytes of the weight (and its scales) read once: at M = 1 it should approach the
GPU's memory bandwidth.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from minisgl.layers.linear import Linear
from minisgl.quant import QuantConfig, make_method
from minisgl.quant.fp8 import WEIGHT_ONLY_MAX_M

from cold import add_timing_options, chosen_bench  # benchmark/cold.py, beside this script

SHAPES = {  # name: (N, K) of Llama-3.1-8B, tp = 1
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
}
SCHEMES = ["int8", "int4", "fp8"]


def quantized_layer(scheme: str, w: torch.Tensor) -> Linear:
    n, k = w.shape
    layer = Linear(k, n, quant=QuantConfig(scheme))
    layer.create_weights(make_method(scheme, w.device, torch.bfloat16))
    layer.write_rows(0, w)
    layer.finalize()
    return layer


def weight_bytes(layer: Linear) -> int:
    return sum(b.numel() * b.element_size() for b in layer.buffers())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    add_timing_options(ap)
    args = ap.parse_args()
    bench = chosen_bench(args)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows = []
    bad = []
    for shape in args.shapes:
        n, k = SHAPES[shape]
        w = torch.randn(n, k, device=dev) * 0.02
        dense = w.to(torch.bfloat16)
        layers = {s: quantized_layer(s, w) for s in SCHEMES}
        deq = {s: layer.method.dequantize(layer) for s, layer in layers.items()}
        for m in args.m:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            t_bf16 = bench(lambda: F.linear(x, dense), return_mode="median")
            row = {"shape": shape, "M": m, "bf16": t_bf16}
            for s, layer in layers.items():
                y = layer(x).float()
                if s == "fp8" and m > WEIGHT_ONLY_MAX_M:  # activations quantized per token too: the same in torch
                    ref = layer.method.apply_emulated(layer, x).float()
                else:
                    ref = x.float() @ deq[s].t()
                rel = ((y - ref).norm() / ref.norm()).item()
                if not rel < 0.01:  # bf16 output rounding is ~0.2%; a wrong kernel is off by O(1)
                    bad.append(f"{s} {shape} M={m}: relative error {rel:.3g}")
                t = bench(lambda layer=layer: layer(x), return_mode="median")
                row[s] = t
                row[s + "_gbs"] = weight_bytes(layer) / t / 1e6
            rows.append(row)
            print(
                f"{shape:8s} M={m:4d} bf16 {t_bf16 * 1000:8.1f} us | "
                + " | ".join(f"{s} {row[s] * 1000:8.1f} us ({t_bf16 / row[s]:.2f}x, {row[s + '_gbs']:.0f} GB/s)" for s in SCHEMES),
                flush=True,
            )  # fmt: skip
    print("\nsummary: speed-up over bf16 F.linear, summed over the shapes (time per decoder layer)")
    print(f"{'M':>5} {'bf16 us':>9} " + " ".join(f"{s:>7}" for s in SCHEMES))
    for m in args.m:
        sel = [r for r in rows if r["M"] == m]
        total = sum(r["bf16"] for r in sel)
        print(f"{m:5d} {total * 1000:9.1f} " + " ".join(f"{total / sum(r[s] for r in sel):6.2f}x" for s in SCHEMES))
    print("correctness:", "all within bounds" if not bad else "FAILED\n  " + "\n  ".join(bad))
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
