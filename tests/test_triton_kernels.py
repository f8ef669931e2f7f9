"""The Triton kernels against plain-torch float64 references.

Without CUDA they run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), on small shapes;
the larger sweeps are marked gpu. Caches are poisoned with NaN everywhere a kernel must not read, and
outputs are pre-filled with NaN, so a stray read or a missed write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from minisgl.kernels.activation import silu_and_mul  # noqa: E402
from minisgl.kernels.decode_attention import decode_attention, num_kv_splits  # noqa: E402
from minisgl.kernels.extend_attention import extend_attention, extend_blocks, extend_tiles  # noqa: E402
from minisgl.kernels.kv_store import store_kv  # noqa: E402
from minisgl.kernels.norm import fused_add_rmsnorm, rmsnorm  # noqa: E402
from minisgl.kernels.rotary import rotary_  # noqa: E402
from minisgl.layers.rotary import (
    RopeConfig,  # noqa: E402
    RotaryEmbedding,  # noqa: E402
)

pytestmark = pytest.mark.slow  # Triton kernels in the interpreter

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Attention outputs are averages of O(1) values; 16-bit runs round P and the output (the interpreter
# truncates instead of rounding to nearest, hence a little more room than one ulp).
ATTN_TOL = {torch.float32: 2e-5, torch.bfloat16: 2.5e-2, torch.float16: 4e-3}
# Elementwise kernels: relative error of two roundings to the dtype.
ULP2 = {torch.float32: 1e-5, torch.bfloat16: 2**-6, torch.float16: 2**-9}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- paged attention ------------------------------------------------------------------------------


def paged_cache(
    seq_lens: list[int], page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K/V caches and a page table for `seq_lens`, pages shuffled across sequences.

    Every slot no sequence owns is NaN, except the zeroed scratch page 0; page-table entries past a
    sequence's last page point at a NaN page, so reading beyond seq_len poisons the result.
    """
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [-(-n // page_size) for n in seq_lens]
    num_pages = sum(pages_per_seq) + 2  # + scratch page 0 + one poisoned page
    slots = num_pages * page_size
    k = torch.full((slots, num_kv_heads, head_dim), float("nan"), dtype=torch.float64)
    v = torch.full_like(k, float("nan"))
    k[:page_size] = 0
    v[:page_size] = 0
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    poison_page = order.pop()
    width = max(pages_per_seq) + 2
    table = torch.full((len(seq_lens), width), poison_page, dtype=torch.int32)
    for b, (n, count) in enumerate(zip(seq_lens, pages_per_seq)):
        pages = [order.pop() for _ in range(count)]
        table[b, :count] = torch.tensor(pages, dtype=torch.int32)
        pos = torch.arange(n)
        slots_b = torch.tensor(pages)[pos // page_size] * page_size + pos % page_size
        k[slots_b] = torch.randn(n, num_kv_heads, head_dim, generator=gen, dtype=torch.float64)
        v[slots_b] = torch.randn(n, num_kv_heads, head_dim, generator=gen, dtype=torch.float64)
    return k.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE), table.to(DEVICE)


def reference_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pages: torch.Tensor,
    page_size: int,
    query_pos: list[int],
    scale: float,
) -> torch.Tensor:
    """float64 attention of queries q [n, Hq, D] at absolute positions `query_pos` of one sequence."""
    kv_len = max(query_pos) + 1
    pos = torch.arange(kv_len)
    slots = pages.cpu().long()[pos // page_size] * page_size + pos % page_size
    keys = k_cache.cpu().double()[slots]  # [L, Hkv, D]
    vals = v_cache.cpu().double()[slots]
    group = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
    vals = vals.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.einsum("nhd,hld->hnl", q.cpu().double(), keys) * scale
    hidden = pos[None, :] > torch.tensor(query_pos)[:, None]
    probs = scores.masked_fill(hidden[None], float("-inf")).softmax(-1)
    return torch.einsum("hnl,hld->nhd", probs, vals)


DECODE_CASES = [
    # page_size, head_dim, q heads, kv heads, seq_lens, splits
    (1, 16, 4, 2, [1, 17, 70], 4),
    (4, 32, 8, 2, [5, 64, 129], 8),
    (16, 16, 2, 2, [16, 33, 200], 1),
    (64, 64, 4, 1, [63, 65, 300], 2),
    (256, 16, 4, 2, [255, 257, 530], 16),
]


def run_decode_case(page_size, head_dim, hq, hkv, seq_lens, splits, dtype, seed=0, pad_rows=1):
    """Decode over `seq_lens`, plus `pad_rows` CUDA-graph padding rows (seq_len 1, page-table row of zeros)."""
    k_cache, v_cache, table = paged_cache(seq_lens, page_size, hkv, head_dim, dtype, seed)
    table = torch.cat([table, torch.zeros(pad_rows, table.shape[1], dtype=torch.int32, device=DEVICE)])
    lens = seq_lens + [1] * pad_rows
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(lens), hq, head_dim, generator=gen).to(dtype).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    seq_lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    decode_attention(q, k_cache, v_cache, table, seq_lens_t, page_size, scale, splits, out=out)
    for b, n in enumerate(lens):
        ref = reference_attention(q[b : b + 1], k_cache, v_cache, table[b], page_size, [n - 1], scale)
        err = (out[b : b + 1].cpu().double() - ref).abs().max().item()
        assert err <= ATTN_TOL[dtype], f"sequence {b} (len {n}): max error {err}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"ps{c[0]}-d{c[1]}-gqa{c[2] // c[3]}-splits{c[5]}")
def test_decode_attention(case, dtype):
    run_decode_case(*case, dtype)


def test_decode_split_count_is_shape_only():
    assert num_kv_splits(1, 8, 132) == 64
    assert num_kv_splits(256, 8, 132) == 1
    for bs in (1, 3, 7, 64, 256):
        n = num_kv_splits(bs, 2, 132)
        assert 1 <= n <= 64 and n & (n - 1) == 0


EXTEND_CASES = [
    # page_size, head_dim, q heads, kv heads, [(prefix, extend), ...]
    (1, 16, 4, 2, [(0, 1), (0, 37), (5, 1), (13, 50)]),
    (4, 32, 8, 2, [(0, 70), (3, 9), (64, 1)]),
    (16, 16, 2, 2, [(0, 16), (16, 17), (30, 40)]),
    (64, 64, 4, 1, [(0, 65), (63, 2)]),
    (256, 16, 4, 2, [(250, 20), (0, 3)]),
]


def run_extend_case(page_size, head_dim, hq, hkv, chunks, dtype, seed=0, blocks=None):
    seq_lens = [p + e for p, e in chunks]
    k_cache, v_cache, table = paged_cache(seq_lens, page_size, hkv, head_dim, dtype, seed)
    extend_lens = [e for _, e in chunks]
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(sum(extend_lens), hq, head_dim, generator=gen).to(dtype).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    block_m, block_n = blocks or extend_blocks(head_dim, dtype)
    cu = [0]
    for e in extend_lens:
        cu.append(cu[-1] + e)
    prefix = torch.tensor([p for p, _ in chunks], dtype=torch.int32, device=DEVICE)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    tiles = extend_tiles(extend_lens, block_m, DEVICE)
    scale = head_dim**-0.5
    extend_attention(q, k_cache, v_cache, table, prefix, cu_t, tiles, page_size, scale, block_m, block_n, out=out)
    for b, (p, e) in enumerate(chunks):
        rows = slice(cu[b], cu[b + 1])
        ref = reference_attention(q[rows], k_cache, v_cache, table[b], page_size, list(range(p, p + e)), scale)
        err = (out[rows].cpu().double() - ref).abs().max().item()
        assert err <= ATTN_TOL[dtype], f"sequence {b} (prefix {p}, extend {e}): max error {err}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", EXTEND_CASES, ids=lambda c: f"ps{c[0]}-d{c[1]}-gqa{c[2] // c[3]}")
def test_extend_attention(case, dtype):
    run_extend_case(*case, dtype)


def test_extend_attention_small_tiles():
    """16 x 16 tiles: many tiles per sequence and many KV blocks per tile."""
    run_extend_case(4, 16, 4, 2, [(0, 40), (21, 35)], torch.float32, blocks=(16, 16))


# ---- KV store -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("src_dtype", ["same", "float32"])
@pytest.mark.parametrize("heads,head_dim", [(2, 16), (3, 32), (8, 128)])
def test_store_kv(dtype, src_dtype, heads, head_dim):
    gen = torch.Generator().manual_seed(heads)
    slots, tokens = 64, 19
    k_cache = torch.randn(slots, heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(slots, heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    loc = torch.randperm(slots, generator=gen)[:tokens].to(DEVICE)
    # k and v as strided views of a fused [T, heads, 3, D] projection (GPT-NeoX's layout).
    src = dtype if src_dtype == "same" else torch.float32
    qkv = torch.randn(tokens, heads, 3, head_dim, generator=gen).to(src).to(DEVICE)
    k, v = qkv[:, :, 1], qkv[:, :, 2]
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_k.index_copy_(0, loc, k.to(dtype))
    want_v.index_copy_(0, loc, v.to(dtype))
    store_kv(k_cache, v_cache, loc, k, v)
    if src == dtype:  # a plain copy: bit-exact
        assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    else:  # a cast: within one rounding (the interpreter truncates where the GPU rounds to nearest)
        unwritten = torch.ones(slots, dtype=torch.bool, device=DEVICE)
        unwritten[loc] = False
        assert torch.equal(k_cache[unwritten], want_k[unwritten]) and torch.equal(v_cache[unwritten], want_v[unwritten])
        for got, want in ((k_cache, want_k), (v_cache, want_v)):
            err = ((got.double() - want.double()).abs() / want.double().abs().clamp_min(1e-3)).max().item()
            assert err <= ULP2[dtype], f"max relative error {err}"


# ---- RMSNorm ------------------------------------------------------------------------------------------


def reference_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.cpu().double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.cpu().double()


def assert_close_ulps(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, roundings: int = 2) -> None:
    out64 = out.cpu().double()
    assert not out64.isnan().any()
    err = ((out64 - ref).abs() / ref.abs().clamp_min(1e-3)).max().item()
    assert err <= ULP2[dtype] * roundings / 2, f"max relative error {err}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(5, 64), (7, 1000), (3, 4096)])
def test_rmsnorm(dtype, shape):
    gen = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(shape[1], generator=gen)).to(dtype).to(DEVICE)
    out = rmsnorm(x, weight, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close_ulps(out, reference_rmsnorm(x, weight, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rmsnorm_per_head_on_strided_view(dtype):
    """Qwen3's q/k norm: [T, heads, head_dim] viewed out of the fused qkv projection (row stride > heads * D)."""
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(6, 4 * 16 + 2 * 2 * 16, generator=gen).to(dtype).to(DEVICE)
    q = qkv[:, : 4 * 16].view(6, 4, 16)
    weight = (1 + 0.1 * torch.randn(16, generator=gen)).to(dtype).to(DEVICE)
    before = qkv.clone()
    out = rmsnorm(q, weight, 1e-6)
    assert out.shape == (6, 4, 16)
    assert_close_ulps(out, reference_rmsnorm(q, weight, 1e-6), dtype)
    assert torch.equal(qkv, before)  # not in place


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("hidden", [64, 1000])
def test_fused_add_rmsnorm_in_place(dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(9, hidden, generator=gen).to(dtype).to(DEVICE)
    residual = torch.randn(9, hidden, generator=gen).to(dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)
    want_residual = (x.cpu().double() + residual.cpu().double()).to(dtype)
    want_out = reference_rmsnorm(want_residual, weight, 1e-5)
    x_ptr, r_ptr = x.data_ptr(), residual.data_ptr()
    out, new_residual = fused_add_rmsnorm(x, residual, weight, 1e-5)
    assert out.data_ptr() == x_ptr and new_residual.data_ptr() == r_ptr
    assert_close_ulps(new_residual, want_residual.double(), dtype)
    assert_close_ulps(out, want_out, dtype, roundings=4)  # the residual's rounding propagates into the norm


# ---- rotary -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "hq,hkv,head_dim,rotary_dim", [(4, 2, 16, 16), (8, 1, 64, 64), (4, 4, 32, 8), (16, 8, 128, 128)]
)
def test_rotary_in_place(dtype, hq, hkv, head_dim, rotary_dim):
    """q and k are rotated as views of one fused qkv tensor; v (the rest of it) must stay untouched."""
    gen = torch.Generator().manual_seed(head_dim)
    tokens = 11
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the table is built in the model dtype, as the engine builds it
    try:
        rotary = RotaryEmbedding(RopeConfig(theta=10000.0, rotary_dim=rotary_dim), 2048, DEVICE)
    finally:
        torch.set_default_dtype(default)
    positions = torch.randint(0, 2048, (tokens,), generator=gen).to(DEVICE)
    rope = rotary.lookup(positions)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * head_dim, generator=gen).to(dtype).to(DEVICE)
    q = qkv[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hkv) * head_dim].view(tokens, hkv, head_dim)
    before = qkv.cpu().double()
    rotary_(q, rope.cos, rope.sin)
    rotary_(k, rope.cos, rope.sin)

    want_q = reference_rotary(before[:, : hq * head_dim].view(tokens, hq, head_dim), rope)
    want_k = reference_rotary(before[:, hq * head_dim : (hq + hkv) * head_dim].view(tokens, hkv, head_dim), rope)
    assert_rotated(q, want_q, dtype)
    assert_rotated(k, want_k, dtype)
    assert torch.equal(qkv[:, (hq + hkv) * head_dim :].cpu().double(), before[:, (hq + hkv) * head_dim :])


def reference_rotary(x: torch.Tensor, rope) -> torch.Tensor:
    half = rope.cos.shape[-1]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos, sin = rope.cos.cpu().double().view(shape), rope.sin.cpu().double().view(shape)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def assert_rotated(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    tol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    assert (got.cpu().double() - want).abs().max().item() <= tol * 4  # |x| <= ~4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_rotary_in_place_neox_layout(dtype):
    """GPT-NeoX: q and k of each head interleaved with v ([T, heads, 3, D]), partial rotary, rotated as the
    [T, heads, 2, D] view; v and the non-rotary dims must stay untouched."""
    gen = torch.Generator().manual_seed(3)
    tokens, heads, head_dim, rotary_dim = 7, 3, 32, 8
    rotary = RotaryEmbedding(RopeConfig(theta=10000.0, rotary_dim=rotary_dim), 512, DEVICE)
    rope = rotary.lookup(torch.randint(0, 512, (tokens,), generator=gen).to(DEVICE))
    qkv = torch.randn(tokens, heads * 3 * head_dim, generator=gen).to(dtype).to(DEVICE).view(tokens, heads, 3, head_dim)
    before = qkv.cpu().double()
    rotary_(qkv[:, :, :2], rope.cos, rope.sin)
    assert_rotated(qkv[:, :, :2], reference_rotary(before[:, :, :2], rope), dtype)
    assert torch.equal(qkv[:, :, 2].cpu().double(), before[:, :, 2])


# ---- SiLU and mul -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", [64, 1000, 2500])
def test_silu_and_mul(dtype, n):
    gen = torch.Generator().manual_seed(n)
    wide = (torch.randn(7, 2 * n + 8, generator=gen) * 3).to(dtype).to(DEVICE)
    x = wide[:, : 2 * n]  # rows strided wider than 2n
    out = silu_and_mul(x)
    x64 = x.cpu().double()
    gate, up = x64[:, :n], x64[:, n:]
    ref = (gate * torch.sigmoid(gate)).to(dtype).double() * up
    assert out.shape == (7, n) and out.dtype == dtype
    err = ((out.cpu().double() - ref).abs() / ref.abs().clamp_min(1e-2)).max().item()
    assert err <= ULP2[dtype], f"max relative error {err}"


# ---- larger sweeps, natively on a GPU -------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("hq,hkv,head_dim", [(16, 8, 128), (32, 8, 128), (8, 8, 64), (14, 2, 64)])
def test_decode_attention_gpu_sweep(dtype, page_size, hq, hkv, head_dim):
    lens = [1, 7, 129, 511, 1024, 3000, 4097]
    for bs in (1, len(lens)):
        splits = num_kv_splits(bs, hkv, torch.cuda.get_device_properties(0).multi_processor_count)
        run_decode_case(page_size, head_dim, hq, hkv, lens[-bs:], splits, dtype, pad_rows=3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("page_size", [1, 16, 256])
@pytest.mark.parametrize("hq,hkv,head_dim", [(16, 8, 128), (32, 8, 128), (8, 8, 64), (4, 2, 16), (4, 2, 32)])
def test_extend_attention_gpu_sweep(dtype, page_size, hq, hkv, head_dim):
    chunks = [(0, 1), (0, 300), (1000, 1), (513, 700), (2048, 64), (7, 2000)]
    run_extend_case(page_size, head_dim, hq, hkv, chunks, dtype)


@pytest.mark.gpu
def test_decode_attention_graph_replay_reads_new_lengths():
    """A captured launch must follow new seq_lens / page-table contents on replay, with a fixed grid."""
    page_size, hq, hkv, head_dim, dtype = 16, 16, 8, 128, torch.bfloat16
    lens_a, lens_b = [5, 900, 33, 2000], [1500, 3, 700, 17]
    cache_lens = [max(a, b) for a, b in zip(lens_a, lens_b)]
    k_cache, v_cache, table = paged_cache(cache_lens, page_size, hkv, head_dim, dtype, seed=3)
    q = torch.randn(len(lens_a), hq, head_dim, device=DEVICE, dtype=dtype)
    seq_lens = torch.tensor(lens_a, dtype=torch.int32, device=DEVICE)
    splits = num_kv_splits(len(lens_a), hkv, torch.cuda.get_device_properties(0).multi_processor_count)
    scale = head_dim**-0.5
    out = torch.empty_like(q)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        decode_attention(q, k_cache, v_cache, table, seq_lens, page_size, scale, splits, out=out)  # compile
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        decode_attention(q, k_cache, v_cache, table, seq_lens, page_size, scale, splits, out=out)
    for lens in (lens_b, lens_a):
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for b, n in enumerate(lens):
            ref = reference_attention(q[b : b + 1], k_cache, v_cache, table[b], page_size, [n - 1], scale)
            assert (out[b : b + 1].cpu().double() - ref).abs().max().item() <= ATTN_TOL[dtype]


def test_reference_attention_matches_sdpa():
    """The float64 reference itself, against PyTorch's SDPA on a contiguous (unpaged) cache."""
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(9, 2, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(9, 2, 16, generator=gen, dtype=torch.float64)
    q = torch.randn(3, 4, 16, generator=gen, dtype=torch.float64)
    ours = reference_attention(q, k, v, torch.arange(9), 1, [6, 7, 8], 0.25)
    mask = torch.arange(9)[None, :] <= torch.tensor([6, 7, 8])[:, None]
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=0.25, enable_gqa=True
    ).transpose(0, 1)
    assert torch.allclose(ours, sdpa, atol=1e-12)
