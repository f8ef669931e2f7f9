"""The native CPU kernels (minisgl/kernels/csrc) against plain torch written the way HF's modules compute."""

from __future__ import annotations

import ctypes
import functools

import pytest
import torch
import torch.nn.functional as F
from test_quant_methods import quantized_linear

from minisgl.kernels import native
from minisgl.kernels.tuning import CPU_INT4_NATIVE_MAX_ROWS, CPU_INT8_NATIVE_MAX_ROWS

pytestmark = pytest.mark.skipif(not native.available(), reason="no native CPU kernels for this CPU or build")

DTYPES = [torch.float32, torch.bfloat16]
# Every ISA level this CPU can run (the lower ones forced with MINISGL_CPU_ISA).
LEVELS = [lvl for lvl in native.LEVELS if native.cpu_level() != "none"
          and native.LEVELS.index(lvl) <= native.LEVELS.index(native.cpu_level())]  # fmt: skip


@pytest.fixture(params=LEVELS)
def at_each_level(request, monkeypatch):
    """Run the test with the kernels of one ISA level loaded."""
    monkeypatch.setenv("MINISGL_CPU_ISA", request.param)
    native._lib.cache_clear()
    assert native.level() == request.param
    yield request.param
    monkeypatch.undo()
    native._lib.cache_clear()


def close(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    # fp32: accumulation order only. bf16: a sum that lands near a rounding boundary may round the other way.
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(ours.float(), ref.float(), rtol=tol, atol=tol)


def hf_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (7, 100), (3, 5, 64)])
def test_rmsnorm(at_each_level, dtype, shape):
    wide = torch.randn(*shape[:-1], shape[-1] + 24).to(dtype)
    x = wide[..., 8 : 8 + shape[-1]]  # rows strided, as a slice of a fused projection is
    w = (torch.rand(shape[-1]) + 0.5).to(dtype)
    out = native.rmsnorm(x, w, 1e-6)
    assert out.shape == x.shape and out.is_contiguous()
    close(out, hf_rmsnorm(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rmsnorm_in_place(at_each_level, dtype):
    x, residual = torch.randn(6, 200).to(dtype), torch.randn(6, 200).to(dtype)
    w = (torch.rand(200) + 0.5).to(dtype)
    summed = x + residual
    out, res = native.fused_add_rmsnorm(x, residual, w, 1e-5)
    assert out.data_ptr() == x.data_ptr() and res.data_ptr() == residual.data_ptr()
    assert torch.equal(res, summed)  # one rounding of the sum, as torch's add
    close(out, hf_rmsnorm(summed, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,half", [(64, 32), (128, 64), (32, 8)], ids=["d64", "d128", "partial"])
def test_rotary(at_each_level, dtype, head_dim, half):
    t, heads = 5, 4
    qkv = torch.randn(t, (heads + 2) * head_dim).to(dtype)
    x = qkv[:, : heads * head_dim].view(t, heads, head_dim)  # token rows strided
    angles = torch.rand(t, half) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    c, s = cos[:, None, :], sin[:, None, :]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    ref = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, rest), dim=-1)  # HF: x cos + rotate_half(x) sin
    untouched = qkv[:, heads * head_dim :].clone()
    native.rotary_(x, cos, sin)
    close(x, ref, dtype)
    assert torch.equal(qkv[:, heads * head_dim :], untouched)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(at_each_level, dtype):
    x = (torch.randn(9, 2 * 300) * 4).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    close(native.silu_and_mul(x), F.silu(gate) * up, dtype)


def reference_attention(q, k_cache, v_cache, slots, lens, scale):
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k_cache.shape[1]
    for b in range(q.shape[0]):
        idx = slots[b, : lens[b]]
        keys = k_cache[idx].double().repeat_interleave(group, dim=1)  # [n, Hq, D]
        vals = v_cache[idx].double().repeat_interleave(group, dim=1)
        probs = torch.softmax(torch.einsum("hd,nhd->hn", q[b].double() * scale, keys), dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", probs, vals)
    return out


def attention_case(batch, q_heads, kv_heads, head_dim, layout, dtype, cache_dtype, max_len, seed=0):
    """Paged caches with every sequence's pages scattered, the new token at each sequence's last position."""
    gen = torch.Generator().manual_seed(seed)
    page, per_seq = 4, max_len // 4 + 1
    pages = 1 + batch * per_seq
    k_cache = torch.randn(pages * page, kv_heads, head_dim, generator=gen).to(cache_dtype)
    v_cache = torch.randn(pages * page, kv_heads, head_dim, generator=gen).to(cache_dtype)
    lens = torch.randint(1, max_len + 1, (batch,), generator=gen)
    lens[0] = 1  # a sequence that sees only its new token
    table = torch.randperm(pages - 1, generator=gen)[: batch * per_seq].view(batch, per_seq) + 1  # 0 is scratch
    width = int(lens.max())
    pos = torch.arange(width)
    slots = table[:, pos // page] * page + pos % page
    slots = slots.masked_fill(pos >= lens[:, None], 0).contiguous()
    out_loc = slots[torch.arange(batch), lens - 1].clone()
    if layout == "fused":
        qkv = torch.randn(batch, (q_heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
        q = qkv[:, : q_heads * head_dim].view(batch, q_heads, head_dim)
        k = qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].view(batch, kv_heads, head_dim)
        v = qkv[:, (q_heads + kv_heads) * head_dim :].view(batch, kv_heads, head_dim)
    else:
        kv = torch.randn(batch, kv_heads, 3, head_dim, generator=gen).to(dtype)  # heads further apart than head_dim
        k, v = kv[:, :, 0], kv[:, :, 2]
        q = torch.randn(batch, q_heads, 2, head_dim, generator=gen).to(dtype)[:, :, 1]
    return q, k, v, out_loc, k_cache, v_cache, slots, lens


ACTIVATIONS_AND_CACHES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                          (torch.float32, torch.float16), (torch.bfloat16, torch.float16)]  # fmt: skip


@pytest.mark.parametrize("dtype,cache_dtype", ACTIVATIONS_AND_CACHES)
@pytest.mark.parametrize(
    "batch,q_heads,kv_heads,head_dim,layout,max_len",
    [
        (5, 9, 3, 64, "fused", 40),  # GQA, q/k/v slices of one projection (Llama)
        (3, 4, 4, 128, "fused", 40),
        (4, 6, 2, 40, "per_head", 40),  # a head size with no specialisation; heads interleaved as GPT-NeoX's
        (16, 9, 3, 64, "fused", 300),  # large enough to split over threads
        (2, 8, 1, 64, "fused", 1100),  # several chunks of positions per sequence, merged
    ],
)
def test_decode_attention(at_each_level, dtype, cache_dtype, batch, q_heads, kv_heads, head_dim, layout, max_len):
    q, k, v, out_loc, k_cache, v_cache, slots, lens = attention_case(
        batch, q_heads, kv_heads, head_dim, layout, dtype, cache_dtype, max_len
    )
    scale = head_dim**-0.5
    out = native.decode_attention(q, k, v, out_loc, k_cache, v_cache, slots, lens, scale)
    # the new k/v are stored rounded to the cache's dtype, as torch rounds (to nearest even)
    assert torch.equal(k_cache[out_loc], k.to(cache_dtype)) and torch.equal(v_cache[out_loc], v.to(cache_dtype))
    close(out, reference_attention(q, k_cache, v_cache, slots, lens, scale), dtype)


def test_decode_attention_is_the_same_in_any_batch_and_on_any_thread_count(at_each_level):
    """A sequence's chunks of positions are fixed by its length: its result does not depend on the sequences
    beside it or on how many threads split the work (so a busy core cannot change a greedy answer)."""
    args = attention_case(6, 9, 3, 64, "fused", torch.float32, torch.float16, 700, seed=3)
    q, k, v, out_loc, k_cache, v_cache, slots, lens = args
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(native.decode_attention(q, k, v, out_loc, k_cache.clone(), v_cache.clone(), slots, lens, 0.125))
        alone = [native.decode_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], out_loc[b : b + 1], k_cache.clone(),
                                         v_cache.clone(), slots[b : b + 1, : lens[b]].contiguous(), lens[b : b + 1],
                                         0.125) for b in range(6)]  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert torch.equal(torch.cat(alone), outs[0])


def test_without_a_library_the_layers_keep_torch_ops(monkeypatch):
    monkeypatch.setenv("MINISGL_CPU_ISA", "none")
    native._lib.cache_clear()
    try:
        assert not native.available() and native.level() == "none"
        assert not native.fits(torch.zeros(2, 4))
    finally:
        native._lib.cache_clear()  # the next caller loads the real library again


def test_struct_layouts_match_the_library():
    lib = native._lib()
    for i, struct in enumerate(native._STRUCTS):
        assert lib.minisgl_sizeof(i) == ctypes.sizeof(struct), struct.__name__


@pytest.mark.parametrize("rows,cols", [(100, 64), (960, 576), (576, 1536), (37, 160)])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 7, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_gemm_matches_torch(at_each_level, rows, cols, batch, dtype):
    layer, _ = quantized_linear("int4", rows, cols, dtype=dtype)  # minisgl's CPU layout, rows padded to 64
    torch.manual_seed(rows + batch)
    x = torch.randn(batch, cols).to(dtype)
    ours = native.int4_gemm(x, layer.qweight, layer.qscale_min, rows)
    assert ours.shape == (batch, rows) and ours.dtype == dtype
    dense = x.double() @ layer.method.dequantize(layer).double().t()
    # fp32: the order of the sums only; bf16: one rounding of the fp32 sum.
    tol = 1e-4 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(ours.double(), dense, rtol=tol, atol=tol)


def q8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] rounded as csrc/int4_q8.h rounds activations: per group of 32, to the nearest multiple of
    max|x| / 127 (fp32 arithmetic, ties to even), back in float64."""
    g = x.float().view(x.shape[0], -1, 32)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.full_like(amax, 127.0) / amax  # a true division (127.0 / t multiplies by t's reciprocal)
    codes = torch.round(g * torch.where(amax > 0, inv, torch.zeros_like(amax)))
    return (codes.double() * (amax / 127.0).double()).view_as(x)


@pytest.mark.parametrize("rows,cols", [(100, 64), (960, 576), (576, 1536)])
@pytest.mark.parametrize("batch", [1, 2, 5, 16, 17, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_gemm_with_int8_activations(at_each_level, rows, cols, batch, dtype):
    """act_q8: exactly the product of the rounded activations with the file's weights, to summation order."""
    layer, _ = quantized_linear("int4", rows, cols, dtype=dtype)
    torch.manual_seed(rows + batch)
    x = torch.randn(batch, cols).to(dtype)
    x[0, :32] = 0  # a group of zeros has no scale
    ours = native.int4_gemm(x, layer.qweight, layer.qscale_min, rows, act_q8=True)
    assert ours.shape == (batch, rows) and ours.dtype == dtype
    weight = layer.method.dequantize(layer).double().t()
    tol = 1e-4 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(ours.double(), q8_rounded(x) @ weight, rtol=tol, atol=tol)
    # and within the rounding's reach of the exact product (about 1% of the output's scale)
    exact = x.double() @ weight
    assert (ours.double() - exact).abs().max() < 0.02 * exact.abs().max()


@pytest.mark.parametrize("scheme,limit", [("int4", CPU_INT4_NATIVE_MAX_ROWS), ("int8", CPU_INT8_NATIVE_MAX_ROWS)])
@pytest.mark.parametrize("dtype,rows", [(torch.float32, 300), (torch.bfloat16, 100), (torch.bfloat16, 300)])
def test_layer_with_int8_activations_picks_its_kernel(scheme, limit, dtype, rows, monkeypatch):
    """A layer with int8 activations runs the integer kernel for every fp32 input, however many rows (it beats
    an fp32 dense matmul at prefill sizes, and a row's result stays that of any batch), and for bf16 inputs only
    up to the scheme's native row limit."""
    layer, _ = quantized_linear(scheme, 96, 64, dtype=dtype)
    layer.method.int8_activations = True
    calls = []
    kernel = getattr(native, f"{scheme}_gemm")
    monkeypatch.setattr(native, f"{scheme}_gemm", lambda *a: calls.append(a[-1]) or kernel(*a))
    x = torch.randn(rows, 64).to(dtype)
    y = layer(x).double()
    integer_kernel = dtype == torch.float32 or rows <= limit
    assert calls == ([True] if integer_kernel else [])
    if integer_kernel:
        tol = 1e-4 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(y, q8_rounded(x) @ layer.method.dequantize(layer).double().t(), rtol=tol, atol=tol)


def test_int4_gemm_refuses_what_it_cannot_read():
    layer, _ = quantized_linear("int4", 64, 64)
    with pytest.raises(ValueError):
        native.int4_gemm(torch.randn(2, 64, dtype=torch.float16), layer.qweight, layer.qscale_min, 64)
    with pytest.raises(ValueError):
        native.int4_gemm(torch.randn(2, 96).bfloat16(), layer.qweight, layer.qscale_min, 64)  # K mismatch


@pytest.mark.parametrize("rows,cols,group", [(4099, 576, 32), (30, 48, 16), (7, 16, 16), (13, 96, 96)])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 9, 16])  # AVX2 takes 3 rows a pass (4: 2 + 2), AVX-512 4
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_gemm_matches_torch(at_each_level, rows, cols, group, batch, dtype):
    torch.manual_seed(rows + batch)
    qweight = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
    scale = torch.rand(rows, cols // group) * 0.01 + 1e-3
    x = torch.randn(batch, cols).to(dtype)
    ours = native.int8_gemm(x, qweight, scale)
    w = qweight.double().view(rows, -1, group) * scale.double().unsqueeze(2)
    dense = x.double() @ w.view(rows, cols).t()
    tol = 1e-4 if dtype == torch.float32 else 2**-7  # fp32: sums of 576 terms of ~1 in another order
    torch.testing.assert_close(ours.double(), dense, rtol=tol, atol=tol)


@pytest.mark.parametrize("rows,cols,group", [(4099, 576, 32), (30, 64, 32), (7, 32, 32), (13, 192, 96)])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 9, 16])  # AVX2 takes 2 rows a pass, AVX-512 4
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_gemm_with_int8_activations(at_each_level, rows, cols, group, batch, dtype):
    """act_q8: exactly the product of the rounded activations with the file's weights, to summation order."""
    torch.manual_seed(rows + batch)
    qweight = torch.randint(-128, 128, (rows, cols), dtype=torch.int8)  # -128 too: a file may hold it
    scale = torch.rand(rows, cols // group) * 0.01 + 1e-3
    x = torch.randn(batch, cols).to(dtype)
    x[0, :32] = 0  # a group of zeros has no scale
    ours = native.int8_gemm(x, qweight, scale, act_q8=True)
    assert ours.shape == (batch, rows) and ours.dtype == dtype
    w = (qweight.double().view(rows, -1, group) * scale.double().unsqueeze(2)).view(rows, cols).t()
    tol = 1e-4 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(ours.double(), q8_rounded(x) @ w, rtol=tol, atol=tol)
    exact = x.double() @ w  # and within the rounding's reach of the exact product
    assert (ours.double() - exact).abs().max() <= 0.02 * exact.abs().max()


def integer_matmul(scheme: str):
    """A [1000 x 576] layer of `scheme` and its integer kernel (act_q8) as a function of x."""
    layer, _ = quantized_linear(scheme, 1000, 576, dtype=torch.float32)
    if scheme == "int4":
        return functools.partial(native.int4_gemm, qweight=layer.qweight, scale_min=layer.qscale_min,
                                 out_features=1000, act_q8=True)  # fmt: skip
    return functools.partial(native.int8_gemm, qweight=layer.qweight, scale=layer.qscale, act_q8=True)


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_integer_kernels_give_a_row_the_same_bits_in_any_call(at_each_level, scheme):
    """act_q8: whatever the batch or the thread count, a row of x gets the same result, so a sampled
    sequence's logits do not depend on what else runs beside it."""
    matmul = integer_matmul(scheme)
    x = torch.randn(16, 576)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for step in (16, 1, 3):  # one call; one row a call; three (int8 on AVX2: passes of 2 and 1)
                results.append(torch.cat([matmul(x[i : i + step]) for i in range(0, 16, step)]))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(r, results[0])


@pytest.mark.skipif(len(LEVELS) < 2, reason="one ISA level on this CPU")
@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_integer_kernels_agree_between_avx2_and_avx512(scheme, monkeypatch):
    """act_q8: the same integer dot products and the same float operations at both levels, to the bit."""
    matmul, x = integer_matmul(scheme), torch.randn(5, 576)
    results = []
    for level in LEVELS:
        monkeypatch.setenv("MINISGL_CPU_ISA", level)
        native._lib.cache_clear()
        results.append(matmul(x))
    monkeypatch.undo()
    native._lib.cache_clear()
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("vocab", [1, 37, 1000, 49152])
@pytest.mark.parametrize("threads", [1, 2])
def test_gumbel_argmax_draws_the_reference_token(at_each_level, vocab, threads):
    """The native draw (noise computed only for tokens that can still win) picks exactly the token of the
    op-by-op reference, argmax(x + gumbel_noise): peaked and flat rows, filtered (-inf) columns, a row with
    nothing left (column 0), a NaN (ranks first), and one row split between threads."""
    from minisgl.engine.draws import gumbel_noise, signed64

    seeds = [0, 1, 2**63 + 5, 12345678901234567, 2**64 - 1, 42, 7, 99]
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(len(seeds), vocab, generator=g) * torch.tensor([3.0, 0.3, 1.0, 3.0, 3.0, 8.0, 0.01, 1.0])[:, None]
    x[1, 100:] = float("-inf")
    x[2] = float("-inf")
    x[3, vocab // 2] = float("nan")
    s = torch.tensor([signed64(v) for v in seeds])
    steps = torch.tensor([0, 1, 7, 100, 2**40, 3, 5, 11])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (slice(None), slice(5, 6)):  # every row, and one alone (its vocabulary split between threads)
            ref = (x[rows] + gumbel_noise(s[rows], steps[rows], vocab)).argmax(dim=-1)
            assert native.gumbel_argmax(x[rows], s[rows], steps[rows]).tolist() == ref.tolist()
    finally:
        torch.set_num_threads(before)


def test_gumbel_argmax_bounds_never_skip_a_winner(at_each_level):
    """Many small rows, whose winners' noise lies all over u's range (not just in its unbounded top slice):
    any bound below a token's real noise would skip a winner somewhere among them."""
    from minisgl.engine.draws import gumbel_noise

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 64, generator=g)
    seeds = torch.randint(-(2**62), 2**62, (2048,), generator=g)
    steps = torch.randint(0, 1 << 20, (2048,), generator=g)
    ref = (x + gumbel_noise(seeds, steps, 64)).argmax(dim=-1)
    assert torch.equal(native.gumbel_argmax(x, seeds, steps), ref)
