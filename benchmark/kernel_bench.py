"""Check and time minisgl's Triton kernels on a GPU against torch eager, torch.compile and FlashInfer.

    python benchmark/kernel_bench.py            # full sweep (a few minutes on an H100)
    python benchmark/kernel_bench.py --quick    # a few shapes per table (about a minute)

Every kernel's output is first compared with a plain-torch computation of the same thing (the `ok` column);
times are medians of triton.testing.do_bench. Decode attention reports the K/V bytes it must read per call
divided by its time (FlashInfer's paged decode reaches about 2.95 TB/s on an H100).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from minisgl.kernels.activation import silu_and_mul
from minisgl.kernels.decode_attention import decode_attention, num_kv_splits
from minisgl.kernels.extend_attention import extend_attention, extend_blocks, extend_tiles
from minisgl.kernels.kv_store import store_kv
from minisgl.kernels.norm import fused_add_rmsnorm, rmsnorm
from minisgl.kernels.rotary import rotary_

try:
    import flashinfer
except Exception:  # absent, or built for another torch/CUDA
    flashinfer = None

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: smoke runs under TRITON_INTERPRET=1
DT = torch.bfloat16
# (name, q heads, kv heads, head_dim)
SHAPES = [("qwen3-0.6b", 16, 8, 128), ("llama-8b", 32, 8, 128)]
# (name, hidden, intermediate, q heads, kv heads, head_dim)
OP_SHAPES = [("qwen3-0.6b", 1024, 3072, 16, 8, 128), ("llama-8b", 4096, 14336, 32, 8, 128)]
PAGE_SIZES = (1, 16)


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds."""
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([f"\n== {title}", line(header), *(line(r) for r in rows)])


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Within tol, relative to the reference's magnitude where that exceeds 1."""
    a, b = a.float(), b.float()
    return bool(torch.isfinite(a).all()) and bool(((a - b).abs() <= tol * b.abs().clamp_min(1)).all())


# ---- paged attention ---------------------------------------------------------------------------------


def paged_layout(seq_lens: list[int], page_size: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """A page table with every sequence's pages scattered over the pool (page 0 left as scratch)."""
    pages = [-(-n // page_size) for n in seq_lens]
    order = torch.randperm(sum(pages), generator=gen, device=DEV).to(torch.int32) + 1
    table = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32, device=DEV)
    start = 0
    for b, n in enumerate(pages):
        table[b, :n] = order[start : start + n]
        start += n
    return table, sum(pages) + 1


def gather_kv(cache: torch.Tensor, table_row: torch.Tensor, n: int, page_size: int) -> torch.Tensor:
    pos = torch.arange(n, device=DEV)
    return cache[table_row[pos // page_size].long() * page_size + pos % page_size]


def torch_paged_attention(q, k_cache, v_cache, table, prefix: list[int], extend: list[int], page_size, scale):
    """Eager reference: gather each sequence's K/V, then SDPA with the causal offset of its prefix."""
    outs, start = [], 0
    for b, (p, e) in enumerate(zip(prefix, extend)):
        k = gather_kv(k_cache, table[b], p + e, page_size).transpose(0, 1)
        v = gather_kv(v_cache, table[b], p + e, page_size).transpose(0, 1)
        qb = q[start : start + e].transpose(0, 1)
        mask = torch.arange(p + e, device=DEV)[None, :] <= (p + torch.arange(e, device=DEV))[:, None]
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(o.transpose(0, 1))
        start += e
    return torch.cat(outs)


def flashinfer_decode(q, k_cache, v_cache, table, seq_lens: list[int], page_size, hq, hkv, d):
    """A planned FlashInfer paged decode over the same pool, or None where FlashInfer is unavailable."""
    if flashinfer is None:
        return None
    try:
        pages = [-(-n // page_size) for n in seq_lens]
        indptr = torch.tensor([0, *torch.tensor(pages).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
        indices = torch.cat([table[b, :n] for b, n in enumerate(pages)])
        last = torch.tensor([n - (p - 1) * page_size for n, p in zip(seq_lens, pages)], dtype=torch.int32, device=DEV)
        ws = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=hq // hkv >= 4)
        wrapper.plan(indptr, indices, last, hq, hkv, d, page_size, q_data_type=q.dtype, kv_data_type=k_cache.dtype)
        kv = (k_cache.view(-1, page_size, hkv, d), v_cache.view(-1, page_size, hkv, d))
        return lambda: wrapper.run(q, kv)
    except Exception as e:  # API drift between FlashInfer versions: report, do not fail the sweep
        print(f"flashinfer decode unavailable: {type(e).__name__}: {e}")
        return None


def decode_rows(batches: list[int], contexts: list[int], num_sms: int) -> list[list[str]]:
    gen = torch.Generator(device=DEV).manual_seed(0)
    rows = []
    for name, hq, hkv, d in SHAPES:
        for page_size in PAGE_SIZES:
            for bs in batches:
                for ctx in contexts:
                    lens = [ctx] * bs
                    table, num_pages = paged_layout(lens, page_size, gen)
                    k_cache = torch.randn(num_pages * page_size, hkv, d, dtype=DT, device=DEV, generator=gen)
                    v_cache = torch.randn_like(k_cache)
                    q = torch.randn(bs, hq, d, dtype=DT, device=DEV, generator=gen)
                    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
                    splits = num_kv_splits(bs, hkv, num_sms)
                    scale = d**-0.5
                    out = torch.empty_like(q)
                    ours = lambda: decode_attention(
                        q, k_cache, v_cache, table, seq_lens, page_size, scale, splits, out=out
                    )  # noqa: E731
                    ours()
                    check = min(bs, 4)
                    ref = torch_paged_attention(
                        q[:check], k_cache, v_cache, table, [ctx - 1] * check, [1] * check, page_size, scale
                    )
                    ok = close(out[:check], ref, 2e-2)
                    kv_bytes = 2 * bs * ctx * hkv * d * k_cache.element_size()
                    ms = bench(ours)
                    fi = flashinfer_decode(q, k_cache, v_cache, table, lens, page_size, hq, hkv, d)
                    fi_ms = None
                    if fi is not None:
                        ok = ok and close(fi(), out, 2e-2)
                        fi_ms = bench(fi)
                    torch_ms = None
                    if bs * ctx <= 32 * 2048:  # the eager gather is slow and large beyond this
                        torch_ms = bench(
                            lambda: torch_paged_attention(
                                q, k_cache, v_cache, table, [ctx - 1] * bs, [1] * bs, page_size, scale
                            )
                        )
                    tbs = lambda t: None if t is None else kv_bytes / (t * 1e-3) / 1e12  # noqa: E731
                    rows.append(
                        [
                            name,
                            str(page_size),
                            str(bs),
                            str(ctx),
                            str(splits),
                            "ok" if ok else "MISMATCH",
                            fmt(ms * 1e3, ".1f"),
                            fmt(tbs(ms), ".2f"),
                            fmt(tbs(fi_ms), ".2f"),
                            fmt(None if torch_ms is None else torch_ms * 1e3, ".0f"),
                        ]
                    )
                    k_cache = v_cache = None  # free this shape's caches before the next one allocates
    return rows


def extend_rows(cases: list[tuple[int, int, int]]) -> list[list[str]]:
    """cases: (batch, prefix, extend)."""
    gen = torch.Generator(device=DEV).manual_seed(1)
    rows = []
    for name, hq, hkv, d in SHAPES:
        for page_size in PAGE_SIZES:
            for bs, prefix, ext in cases:
                lens = [prefix + ext] * bs
                table, num_pages = paged_layout(lens, page_size, gen)
                k_cache = torch.randn(num_pages * page_size, hkv, d, dtype=DT, device=DEV, generator=gen)
                v_cache = torch.randn_like(k_cache)
                q = torch.randn(bs * ext, hq, d, dtype=DT, device=DEV, generator=gen)
                block_m, block_n = extend_blocks(d, DT)
                tiles = extend_tiles([ext] * bs, block_m, DEV)
                prefix_t = torch.full((bs,), prefix, dtype=torch.int32, device=DEV)
                cu = torch.arange(0, bs + 1, dtype=torch.int32, device=DEV) * ext
                scale = d**-0.5
                out = torch.empty_like(q)
                ours = lambda: extend_attention(
                    q, k_cache, v_cache, table, prefix_t, cu, tiles, page_size, scale, block_m, block_n, out=out
                )  # noqa: E731
                ours()
                eager = lambda: torch_paged_attention(
                    q, k_cache, v_cache, table, [prefix] * bs, [ext] * bs, page_size, scale
                )  # noqa: E731
                ok = close(out, eager(), 2e-2)
                # causal FLOPs: each new token i attends prefix + i + 1 positions; QK and PV are 2 * d each
                flops = 4 * d * hq * bs * sum(prefix + i + 1 for i in range(ext))
                ms, torch_ms = bench(ours), bench(eager)
                rows.append(
                    [
                        name,
                        str(page_size),
                        str(bs),
                        str(prefix),
                        str(ext),
                        "ok" if ok else "MISMATCH",
                        fmt(ms * 1e3, ".0f"),
                        fmt(flops / (ms * 1e-3) / 1e12, ".1f"),
                        fmt(torch_ms * 1e3, ".0f"),
                    ]
                )
                k_cache = v_cache = None  # free this shape's caches before the next one allocates
    return rows


# ---- fused elementwise ops ------------------------------------------------------------------------------


def eager_rmsnorm(x, w, eps=1e-6):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def eager_add_rmsnorm(x, r, w, eps=1e-6):
    r = x + r
    return F.rms_norm(r, (r.shape[-1],), w, eps), r


def eager_rotary(x, cos, sin):
    half = cos.shape[-1]
    c, s = cos[:, None], sin[:, None]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x[..., 2 * half :]], dim=-1)


def eager_silu_mul(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def eager_store(kc, vc, loc, k, v):
    kc.index_copy_(0, loc, k)
    vc.index_copy_(0, loc, v)


def op_rows(token_counts: list[int]) -> list[list[str]]:
    gen = torch.Generator(device=DEV).manual_seed(2)
    compiled = {f: torch.compile(f) for f in (eager_rmsnorm, eager_add_rmsnorm, eager_rotary, eager_silu_mul)}
    rows = []
    for tokens in token_counts:
        for name, hidden, inter, hq, hkv, d in OP_SHAPES:
            x = torch.randn(tokens, hidden, dtype=DT, device=DEV, generator=gen)
            r = torch.randn_like(x)
            w = 1 + 0.1 * torch.randn(hidden, dtype=DT, device=DEV, generator=gen)
            gu = torch.randn(tokens, 2 * inter, dtype=DT, device=DEV, generator=gen)
            qk = torch.randn(tokens, hq + hkv, d, dtype=DT, device=DEV, generator=gen)
            angles = torch.rand(tokens, d // 2, device=DEV, generator=gen) * 100
            cos, sin = angles.cos().to(DT), angles.sin().to(DT)
            slots = 4 * tokens + 64
            kc = torch.zeros(slots, hkv, d, dtype=DT, device=DEV)
            vc = torch.zeros_like(kc)
            loc = torch.randperm(slots, generator=gen, device=DEV)[:tokens]
            k, v = qk[:, hq:], torch.randn(tokens, hkv, d, dtype=DT, device=DEV, generator=gen)
            e = x.element_size()

            def rot_ours():
                y = qk.clone()
                rotary_(y, cos, sin)
                return y

            rx, rr = x.clone(), r.clone()
            kc2, vc2 = kc.clone(), vc.clone()
            store_kv(kc2, vc2, loc, k, v)
            eager_store(kc, vc, loc, k, v)
            checks = {
                "rmsnorm": (
                    lambda: rmsnorm(x, w, 1e-6),
                    lambda: eager_rmsnorm(x, w),
                    compiled[eager_rmsnorm],
                    (x, w),
                    close(rmsnorm(x, w, 1e-6), eager_rmsnorm(x, w), 3e-2),
                    2 * x.numel() * e,
                ),
                "add+rmsnorm": (
                    lambda: fused_add_rmsnorm(rx, rr, w, 1e-6),
                    lambda: eager_add_rmsnorm(x, r, w),
                    compiled[eager_add_rmsnorm],
                    (x, r, w),
                    close(fused_add_rmsnorm(x.clone(), r.clone(), w, 1e-6)[0], eager_add_rmsnorm(x, r, w)[0], 3e-2),
                    4 * x.numel() * e,
                ),
                "rotary(q,k)": (
                    rot_ours,
                    lambda: eager_rotary(qk, cos, sin),
                    compiled[eager_rotary],
                    (qk, cos, sin),
                    close(rot_ours(), eager_rotary(qk, cos, sin), 3e-2),
                    2 * qk.numel() * e,
                ),
                "silu*mul": (
                    lambda: silu_and_mul(gu),
                    lambda: eager_silu_mul(gu),
                    compiled[eager_silu_mul],
                    (gu,),
                    close(silu_and_mul(gu), eager_silu_mul(gu), 3e-2),
                    1.5 * gu.numel() * e,
                ),
                "store_kv": (
                    lambda: store_kv(kc2, vc2, loc, k, v),
                    lambda: eager_store(kc, vc, loc, k, v),
                    None,
                    (),
                    torch.equal(kc2, kc) and torch.equal(vc2, vc),
                    4 * k.numel() * e,
                ),
            }
            for op, (ours, eager, comp, args, ok, nbytes) in checks.items():
                ms, eager_ms = bench(ours), bench(eager)
                comp_ms = None if comp is None else bench(lambda: comp(*args))
                rows.append(
                    [
                        op,
                        name,
                        str(tokens),
                        "ok" if ok else "MISMATCH",
                        fmt(ms * 1e3, ".1f"),
                        fmt(nbytes / (ms * 1e-3) / 1e9, ".0f"),
                        fmt(eager_ms * 1e3, ".1f"),
                        fmt(None if comp_ms is None else comp_ms * 1e3, ".1f"),
                    ]
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip", nargs="*", default=[], choices=["decode", "extend", "ops"])
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(
        f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}, "
        f"flashinfer {getattr(flashinfer, '__version__', None) if flashinfer else 'absent'}",
        flush=True,
    )
    out = []
    if "decode" not in args.skip:
        batches, contexts = ([1, 32, 256], [512, 8192]) if args.quick else ([1, 8, 32, 64, 128, 256], [512, 2048, 8192])
        rows = decode_rows(batches, contexts, props.multi_processor_count)
        out.append(
            table(
                "decode attention (bf16; TB/s = K+V bytes read / time)",
                [
                    "shape",
                    "page",
                    "bs",
                    "ctx",
                    "splits",
                    "check",
                    "ours us",
                    "ours TB/s",
                    "flashinfer TB/s",
                    "torch us",
                ],
                rows,
            )
        )
        print(out[-1], flush=True)
    if "extend" not in args.skip:
        cases = [(1, 0, 2048), (4, 1024, 512), (1, 4096, 4096)]
        if not args.quick:
            cases += [(1, 0, 512), (1, 0, 8192), (8, 0, 1024), (16, 2048, 1)]
        rows = extend_rows(cases)
        out.append(
            table(
                "extend attention (bf16, causal over prefix + chunk)",
                ["shape", "page", "bs", "prefix", "extend", "check", "ours us", "ours TFLOP/s", "torch us"],
                rows,
            )
        )
        print(out[-1], flush=True)
    if "ops" not in args.skip:
        rows = op_rows([1, 4096] if args.quick else [1, 64, 512, 4096, 16384])
        out.append(
            table(
                "fused ops (bf16; GB/s = bytes moved / time)",
                ["op", "shape", "tokens", "check", "ours us", "ours GB/s", "eager us", "compile us"],
                rows,
            )
        )
        print(out[-1], flush=True)
    print("\n\n######## summary" + "".join(out))
    assert not any("MISMATCH" in t for t in out), "a kernel disagreed with its reference"


if __name__ == "__main__":
    main()
