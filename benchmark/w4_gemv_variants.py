"""The W4A16 GEMV experiments of 2026-11-25, on Llama-3.1-8B's shapes at M=1: the in-tree kernel against the
kernel it replaced ("bytes") and the variants tried on that one (ways of turning nibbles into floats without
int-to-float conversions, reading int32 words), each over a sweep of launch configs.

    python benchmark/w4_gemv_variants.py                                   # every variant, wide sweep
    python benchmark/w4_gemv_variants.py --variants current mantissa --shapes qkv o gate_up
    python benchmark/w4_gemv_variants.py --variants magic --sweep narrow --shapes qkv
    python benchmark/w4_gemv_variants.py --cudagraph     # time CUDA-graph replays, without launch overhead
    python benchmark/w4_gemv_variants.py --cold --variants current   # replays with the weights out of L2

Prints, per shape, bf16 F.linear and the in-tree autotuned `w4a16_linear`, then each variant's best config
(triton.testing.do_bench medians) and its error against `w4a16_linear`. "magic", "mantissa" and "words" lost
to "bytes" (see docs/benchmarks.md); "current" is the in-tree kernel, which counts instructions per nibble
instead (one lop3, one FMA, a third of a shift). The others stay here as the record. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from minisgl.quant import triton_kernels as tk
from minisgl.quant.int4 import quantize_int4

from cold import add_timing_options, chosen_bench  # benchmark/cold.py, beside this script


@triton.jit
def _bytes(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K: tl.constexpr, stride_xm, stride_ym,
           BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):  # fmt: skip
    # The in-tree kernel until 2026-11-25: bytes [BLOCK_N, GROUPS, 16], nibbles converted with int-to-float.
    EVEN_G: tl.constexpr = (K // 32) % GROUPS == 0
    pid = tl.program_id(0)
    m = pid % M
    n = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    g = tl.arange(0, GROUPS)
    j = tl.arange(0, 16)
    num_groups: tl.constexpr = K // 32
    n64 = n.to(tl.int64)
    # One group of a row is 16 contiguous bytes: columns 32g + j (low nibble) and 32g + 16 + j (high nibble).
    w_ptrs = w_ptr + n64[:, None, None] * (K // 2) + g[None, :, None] * 16 + j[None, None, :]
    sz_off = n64[:, None] * num_groups + g[None, :]
    x_ptrs = x_ptr + m * stride_xm + g[:, None] * 32 + j[None, :]
    acc = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    for g0 in range(0, num_groups, GROUPS):
        if EVEN_G:
            b = tl.load(w_ptrs, mask=n_ok[:, None, None], other=0)
            x_lo = tl.load(x_ptrs).to(tl.float32)
            x_hi = tl.load(x_ptrs + 16).to(tl.float32)
            s = tl.load(s_ptr + sz_off, mask=n_ok[:, None], other=0.0).to(tl.float32)
            z = tl.load(z_ptr + sz_off, mask=n_ok[:, None], other=0.0).to(tl.float32)
        else:
            g_ok = g0 + g < num_groups
            b = tl.load(w_ptrs, mask=n_ok[:, None, None] & g_ok[None, :, None], other=0)
            x_lo = tl.load(x_ptrs, mask=g_ok[:, None], other=0.0).to(tl.float32)
            x_hi = tl.load(x_ptrs + 16, mask=g_ok[:, None], other=0.0).to(tl.float32)
            sz_ok = n_ok[:, None] & g_ok[None, :]
            s = tl.load(s_ptr + sz_off, mask=sz_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + sz_off, mask=sz_ok, other=0.0).to(tl.float32)
        q_lo = (b & 0xF).to(tl.float32)
        q_hi = (b >> 4).to(tl.float32)
        # sum_k x_k ((q_k - 8) s + z) = s (sum_k x_k q_k - 8 sum_k x_k) + z sum_k x_k, per group.
        xq = tl.sum(q_lo * x_lo[None, :, :] + q_hi * x_hi[None, :, :], axis=2)
        xs = tl.sum(x_lo + x_hi, axis=1)[None, :]
        acc += s * (xq - 8.0 * xs) + z * xs
        w_ptrs += GROUPS * 16
        x_ptrs += GROUPS * 32
        sz_off += GROUPS
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + m * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _magic(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K: tl.constexpr, stride_xm, stride_ym,
           BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):  # fmt: skip
    # Bytes as in the current kernel; a nibble becomes a float by OR-ing it into the mantissa of 2^23 and
    # subtracting 2^23 (no int-to-float conversion instruction).
    pid = tl.program_id(0)
    m = pid % M
    n = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    g = tl.arange(0, GROUPS)
    j = tl.arange(0, 16)
    num_groups: tl.constexpr = K // 32
    n64 = n.to(tl.int64)
    w_ptrs = w_ptr + n64[:, None, None] * (K // 2) + g[None, :, None] * 16 + j[None, None, :]
    sz_off = n64[:, None] * num_groups + g[None, :]
    x_ptrs = x_ptr + m * stride_xm + g[:, None] * 32 + j[None, :]
    acc = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    for g0 in range(0, num_groups, GROUPS):
        b = tl.load(w_ptrs, mask=n_ok[:, None, None], other=0).to(tl.int32)
        x_lo = tl.load(x_ptrs).to(tl.float32)
        x_hi = tl.load(x_ptrs + 16).to(tl.float32)
        s = tl.load(s_ptr + sz_off, mask=n_ok[:, None], other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz_off, mask=n_ok[:, None], other=0.0).to(tl.float32)
        q_lo = ((b & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        q_hi = ((b >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        xq = tl.sum(q_lo * x_lo[None, :, :] + q_hi * x_hi[None, :, :], axis=2)
        xs = tl.sum(x_lo + x_hi, axis=1)[None, :]
        acc += s * (xq - 8.0 * xs) + z * xs
        w_ptrs += GROUPS * 16
        x_ptrs += GROUPS * 32
        sz_off += GROUPS
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + m * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _mantissa(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K: tl.constexpr, stride_xm, stride_ym,
              BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):  # fmt: skip
    # int32 words; each nibble is shifted into mantissa bits 19..22 of 1.0, f = 1 + q/16, and the dot product
    # is recovered as sum 16 x f - 16 sum x (the kernel of branch w4-gemv).
    pid = tl.program_id(0)
    m = pid % M
    n = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    g = tl.arange(0, GROUPS)
    w4 = tl.arange(0, 4)
    num_groups: tl.constexpr = K // 32
    n64 = n.to(tl.int64)
    w_ptrs = w_ptr + n64[:, None, None] * (K // 8) + g[None, :, None] * 4 + w4[None, None, :]
    sz_off = n64[:, None] * num_groups + g[None, :]
    x_ptrs = x_ptr + m * stride_xm + g[:, None] * 32 + w4[None, :] * 4
    acc = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    MASK: tl.constexpr = 0xF << 19
    for g0 in range(0, num_groups, GROUPS):
        word = tl.load(w_ptrs, mask=n_ok[:, None, None], other=0)
        s = tl.load(s_ptr + sz_off, mask=n_ok[:, None], other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz_off, mask=n_ok[:, None], other=0.0).to(tl.float32)
        d = tl.zeros([BLOCK_N, GROUPS, 4], dtype=tl.float32)
        xsum = tl.zeros([GROUPS, 4], dtype=tl.float32)
        for i in tl.static_range(4):
            for h in tl.static_range(2):
                sh = 8 * i + 4 * h
                if sh <= 19:
                    t = word << (19 - sh)
                else:
                    t = word >> (sh - 19)
                f = ((t & MASK) | 0x3F800000).to(tl.float32, bitcast=True)
                xv = tl.load(x_ptrs + (16 * h + i)).to(tl.float32)
                xsum += xv
                d += f * (xv * 16.0)[None, :, :]
        xs = tl.sum(xsum, axis=1)[None, :]
        xq = tl.sum(d, axis=2) - 16.0 * xs
        acc += s * (xq - 8.0 * xs) + z * xs
        w_ptrs += GROUPS * 4
        x_ptrs += GROUPS * 32
        sz_off += GROUPS
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + m * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)



@triton.jit
def _words(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K: tl.constexpr, stride_xm, stride_ym,
           BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):  # fmt: skip
    # The current kernel's arithmetic, but the weight read as int32 words [BLOCK_N, GROUPS, 4] (16 bytes per
    # group, so one 128-bit load per thread and group), bytes split out with shifts.
    pid = tl.program_id(0)
    m = pid % M
    n = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    g = tl.arange(0, GROUPS)
    w4 = tl.arange(0, 4)
    shifts = tl.arange(0, 4) * 8
    num_groups: tl.constexpr = K // 32
    n64 = n.to(tl.int64)
    w_ptrs = w_ptr + n64[:, None, None] * (K // 8) + g[None, :, None] * 4 + w4[None, None, :]
    sz_off = n64[:, None] * num_groups + g[None, :]
    # byte i of word w holds columns 32g + 4w + i (low nibble) and 32g + 16 + 4w + i (high nibble)
    x_ptrs = x_ptr + m * stride_xm + g[:, None, None] * 32 + w4[None, :, None] * 4 + w4[None, None, :]
    acc = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    for g0 in range(0, num_groups, GROUPS):
        word = tl.load(w_ptrs, mask=n_ok[:, None, None], other=0)
        s = tl.load(s_ptr + sz_off, mask=n_ok[:, None], other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz_off, mask=n_ok[:, None], other=0.0).to(tl.float32)
        x_lo = tl.load(x_ptrs).to(tl.float32)
        x_hi = tl.load(x_ptrs + 16).to(tl.float32)
        b = (word[:, :, :, None] >> shifts[None, None, None, :]) & 0xFF
        q_lo = (b & 0xF).to(tl.float32)
        q_hi = (b >> 4).to(tl.float32)
        xq = tl.sum(tl.sum(q_lo * x_lo[None] + q_hi * x_hi[None], axis=3), axis=2)
        xs = tl.sum(tl.sum(x_lo + x_hi, axis=2), axis=1)[None, :]
        acc += s * (xq - 8.0 * xs) + z * xs
        w_ptrs += GROUPS * 4
        x_ptrs += GROUPS * 32
        sz_off += GROUPS
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + m * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


SWEEPS = {
    "narrow": [(bn, gr, w, 3) for bn, gr in [(4, 32), (8, 16), (8, 32), (16, 8), (16, 16), (2, 64)] for w in (4, 8)],
    # The in-tree kernel puts threads along GROUPS * 4 words; GROUPS = 32 x warps gives each thread one group.
    "current": [(bn, gr * w, w, st) for bn in (8, 16, 32) for gr in (8, 16, 32) for w in (2, 4, 8) for st in (2, 3)],
    # the in-tree autotune list
    "tuned": [(c.kwargs["BLOCK_N"], c.kwargs["GROUPS"], c.num_warps, c.num_stages) for c in tk._GEMV_W4_CONFIGS],
    "wide": [(bn, gr, w, st) for bn, gr in [(1, 32), (2, 32), (2, 64), (4, 16), (4, 32), (8, 16), (8, 32), (16, 8),
                                             (16, 16)] for w in (1, 2, 4, 8) for st in (2, 4)],
}  # fmt: skip
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
# variant: (kernel, reads int32 words, extra constexprs, sweep for --sweep wide)
VARIANTS = {"current": (tk._w4_gemv, True, {"USE_ASM": True, "PDL": False}, "current"),
            "bytes": (_bytes, False, {}, "wide"),
            "magic": (_magic, False, {}, "wide"), "mantissa": (_mantissa, True, {}, "wide"),
            "words": (_words, True, {}, "wide")}


def best_config(kernel, words: bool, extra: dict, shape, tensors, sweep, bench):
    n, k = shape
    x, packed, scale, zero, ref = tensors
    weight = packed.view(torch.int32) if words else packed
    best = None
    for bn, groups, warps, stages in sweep:
        if (k // 32) % groups:
            continue
        y = torch.empty(1, n, device=x.device, dtype=torch.bfloat16)

        def run():
            kernel[(triton.cdiv(n, bn),)](x, weight, scale, zero, y, 1, n, k, x.stride(0), y.stride(0),
                                          BLOCK_N=bn, GROUPS=groups, num_warps=warps, num_stages=stages, **extra)  # fmt: skip

        run()
        err = ((y.float() - ref).norm() / ref.norm()).item()
        t = bench(run, return_mode="median")
        if best is None or t < best[0]:
            best = (t, f"BN={bn} G={groups} w={warps} s={stages}", err)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--sweep", choices=list(SWEEPS), default="wide")
    add_timing_options(ap)
    args = ap.parse_args()
    bench = chosen_bench(args)
    torch.manual_seed(0)
    for name in args.shapes:
        n, k = SHAPES[name]
        blocks = quantize_int4(torch.randn(n, k, device="cuda") * 0.02, torch.bfloat16)
        packed = blocks.packed.contiguous()
        scale, zero = blocks.scale.to(torch.bfloat16).contiguous(), blocks.zero.to(torch.bfloat16).contiguous()
        nbytes = packed.numel() + 2 * scale.numel() + 2 * zero.numel()
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = tk.w4a16_linear(x, packed, scale, zero).float()
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        t_bf16 = bench(lambda: torch.nn.functional.linear(x, dense), return_mode="median")
        t_tree = bench(lambda: tk.w4a16_linear(x, packed, scale, zero), return_mode="median")
        print(f"{name}: bf16 {t_bf16 * 1e3:.1f} us | w4a16_linear {t_tree * 1e3:.1f} us "
              f"({nbytes / t_tree / 1e9:.2f} TB/s)", flush=True)  # fmt: skip
        for variant in args.variants:
            kernel, words, extra, own_sweep = VARIANTS[variant]
            tensors = (x, packed, scale, zero, ref)
            sweep = SWEEPS[own_sweep if args.sweep == "wide" else args.sweep]
            t, config, err = best_config(kernel, words, extra, (n, k), tensors, sweep, bench)
            print(f"  {variant}: {t * 1e3:.1f} us ({nbytes / t / 1e9:.2f} TB/s) {config} rel. err {err:.1e}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
