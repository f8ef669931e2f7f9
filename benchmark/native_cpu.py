"""The native CPU kernels (minisgl/kernels/csrc) at every ISA level this CPU runs, against plain torch ops, on
the default model's shapes (SmolLM2-135M: hidden 576, intermediate 1536, vocabulary 49152, 9/3 heads of 64).

    python benchmark/native_cpu.py
    python benchmark/native_cpu.py --rows 1 4 16 64 --repeats 300 --dtype float32 --levels avx2

int4: minisgl's CPU layout (native: fp32 products, as a named --dtype runs them; native_q8: on activations rounded
to int8 per 32, as --dtype auto does) vs a dense matmul on the dequantized weight (torch's best plain op; and with
the weight expanded on every call, as layers do for prefill-sized inputs) and torch's own packed int4 kernel
(aten._weight_int4pack_mm_for_cpu, on a weight packed for it). int8 (native and native_q8 likewise): per-group
scales vs the dense matmul and aten._weight_int8pack_mm. Small ops: RMSNorm, rotary, SiLU-and-mul and paged
decode attention vs the torch ops the layers run without native kernels. Median microseconds per call, weights
hot in cache. Each level is loaded with MINISGL_CPU_ISA; run with ATEN_CPU_CAPABILITY=avx2 to see torch as on an
AVX2 CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from minisgl.kernels import native
from minisgl.layers.linear import Linear
from minisgl.quant import QuantConfig, make_method
from minisgl.quant.int4 import expand_cpu

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


def quantized(scheme: str, rows: int, cols: int, dtype: torch.dtype) -> Linear:
    layer = Linear(cols, rows, quant=QuantConfig(scheme))
    layer.create_weights(make_method(scheme, torch.device("cpu"), dtype))
    layer.write_rows(0, torch.randn(rows, cols) * 0.05)
    layer.finalize()
    return layer


def row(name: str, shape: str, m: int, times: dict[str, float]) -> None:
    cells = "  ".join(f"{k} {v:8.1f}" for k, v in times.items())
    print(f"  {name:14s} {shape:>11s} {m:4d}  {cells}", flush=True)


def bench_level(args, dtype: torch.dtype) -> None:
    rep = args.repeats
    for name, (n, k) in INT4_SHAPES.items():
        layer = quantized("int4", n, k, dtype)
        dense = layer.method.dequantize(layer).to(dtype)
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.rand(k // 32, n, 2).to(dtype)
        for m in args.rows:
            x = torch.randn(m, k).to(dtype)
            times = {
                "native": median_us(lambda: native.int4_gemm(x, layer.qweight, layer.qscale_min, n), rep),
                "native_q8": median_us(lambda: native.int4_gemm(x, layer.qweight, layer.qscale_min, n, True), rep),
                "dense": median_us(lambda: F.linear(x, dense), rep),
                "expand+dense": median_us(
                    lambda: (
                        layer.method.apply(layer, x)
                        if m >= 512
                        else F.linear(x, expand_cpu(layer.qweight, layer.qscale_min, dtype))
                    ),
                    rep,
                ),
                "aten_int4": median_us(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz), rep),
            }
            row(f"int4 {name}", f"{n}x{k}", m, times)
    for name, (n, k) in INT8_SHAPES.items():
        layer = quantized("int8", n, k, dtype)
        dense = layer.method.dequantize(layer).to(dtype)
        q, scale = layer.qweight, layer.qscale[:, 0].contiguous().to(dtype)
        for m in args.rows:
            x = torch.randn(m, k).to(dtype)
            r = max(10, rep // 10)
            times = {
                "native": median_us(lambda: native.int8_gemm(x, layer.qweight, layer.qscale), r),
                "native_q8": median_us(lambda: native.int8_gemm(x, layer.qweight, layer.qscale, True), r),
                "dense": median_us(lambda: F.linear(x, dense), r),
                "aten_int8": median_us(lambda: torch.ops.aten._weight_int8pack_mm(x, q, scale), r),
            }
            row(f"int8 {name}", f"{n}x{k}", m, times)
    for m in args.rows:
        x, w = torch.randn(m, 576).to(dtype), torch.rand(576).to(dtype)

        def torch_rms():
            h = x.float()
            return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)

        row("rmsnorm", "576", m, {"native": median_us(lambda: native.rmsnorm(x, w, 1e-5), rep),
                                  "torch": median_us(torch_rms, rep)})  # fmt: skip
        gu = torch.randn(m, 3072).to(dtype)
        row(
            "silu_and_mul",
            "1536",
            m,
            {
                "native": median_us(lambda: native.silu_and_mul(gu), rep),
                "torch": median_us(lambda: F.silu(gu[:, :1536]) * gu[:, 1536:], rep),
            },
        )
        qk = torch.randn(m, 12, 64).to(dtype)
        ang = torch.rand(m, 32)
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)

        def torch_rope():
            c, s = cos[:, None], sin[:, None]
            x1, x2 = qk[..., :32], qk[..., 32:]
            return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)

        row("rotary", "12x64", m, {"native": median_us(lambda: native.rotary_(qk, cos, sin), rep),
                                   "torch": median_us(torch_rope, rep)})  # fmt: skip
        ctx = args.context
        kc, vc = torch.randn(m * ctx + 1, 3, 64).to(dtype), torch.randn(m * ctx + 1, 3, 64).to(dtype)
        slots = torch.arange(m * ctx).view(m, ctx) + 1
        lens = torch.full((m,), ctx)
        out_loc = slots[:, -1].clone()
        q, kn, vn = torch.randn(m, 9, 64).to(dtype), torch.randn(m, 3, 64).to(dtype), torch.randn(m, 3, 64).to(dtype)

        def torch_attn():
            kc[out_loc], vc[out_loc] = kn, vn
            keys, vals = kc[slots].repeat_interleave(3, 2), vc[slots].repeat_interleave(3, 2)  # [m, ctx, 9, 64]
            return F.scaled_dot_product_attention(q.unsqueeze(2), keys.transpose(1, 2), vals.transpose(1, 2))

        row("decode_attn", f"ctx{ctx}", m, {
            "native": median_us(lambda: native.decode_attention(q, kn, vn, out_loc, kc, vc, slots, lens, 0.125), rep),
            "torch": median_us(torch_attn, rep)})  # fmt: skip
        if dtype == torch.float32:  # over an fp16 cache (--kv-cache-dtype float16, the AVX2 default for a GGUF)
            kc16, vc16 = kc.half(), vc.half()

            def torch_attn16():
                kc16[out_loc], vc16[out_loc] = kn.half(), vn.half()
                keys = kc16[slots].float().repeat_interleave(3, 2)
                vals = vc16[slots].float().repeat_interleave(3, 2)
                return F.scaled_dot_product_attention(q.unsqueeze(2), keys.transpose(1, 2), vals.transpose(1, 2))

            row("decode_attn_kv16", f"ctx{ctx}", m, {
                "native": median_us(
                    lambda: native.decode_attention(q, kn, vn, out_loc, kc16, vc16, slots, lens, 0.125), rep),
                "torch": median_us(torch_attn16, rep)})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--context", type=int, default=256, help="tokens each sequence attends over")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--levels", nargs="+", default=None, help="default: every level this CPU runs")
    args = ap.parse_args()
    best = native.cpu_level()
    levels = args.levels or [lvl for lvl in native.LEVELS if best != "none"
                             and native.LEVELS.index(lvl) <= native.LEVELS.index(best)]  # fmt: skip
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, torch CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY')}"
    )
    for level in levels:
        os.environ["MINISGL_CPU_ISA"] = level
        native._lib.cache_clear()
        assert native.level() == level, f"level {level} did not load"
        for name in args.dtype:
            print(f"[{level}, {name}] microseconds per call (median)")
            bench_level(args, getattr(torch, name))


if __name__ == "__main__":
    main()
