"""Paged decode attention: one query token per sequence against its whole cached context, split-KV.

Layouts:
- q: [B, num_q_heads, head_dim], any strides with a contiguous last dim; the output is [B, num_q_heads,
  head_dim] contiguous, in q's dtype.
- k_cache, v_cache: one layer of the pool, [slots, num_kv_heads, head_dim] with a contiguous last dim.
- page_table: [B, >= ceil(max seq_len / page_size)] int32 (row stride free); seq_lens: [B] int32, >= 1.
- q head h reads kv head h // (num_q_heads // num_kv_heads).

Graph safety: the launch grid is (B, num_kv_heads, num_splits), fixed by host-side shapes only. Each program
derives its slice of the context from `seq_lens` on the device, so a captured launch stays valid whatever
the lengths are on replay, and nothing here syncs with the host.

Stage 1: program (b, kv head, split) loads the split's K/V blocks once for all the query heads of its GQA
group (a [group, head_dim] x [head_dim, BLOCK_N] dot) and writes a normalised partial output and its
log-sum-exp. Stage 2 merges the splits per (b, q head). With one split, stage 1 writes the output directly.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from minisgl.kernels import pdl
from minisgl.kernels.paging import load_kv_block, online_softmax_step

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 64


@triton.jit
def _split_len(seq_len, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tokens per split, a multiple of BLOCK_N; splits past the context's end are empty."""
    return tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N


@triton.jit
def _decode_partial_kernel(
    Q,
    K,
    V,
    PageTable,
    SeqLens,
    PartOut,
    PartLse,
    Out,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_pt,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.begin(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_q_heads = tl.num_programs(1) * GROUP

    seq_len = tl.load(SeqLens + seq)
    per_split = _split_len(seq_len, NUM_SPLITS, BLOCK_N)
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    h = tl.arange(0, BLOCK_H)
    head = kv_head * GROUP + h
    hmask = h < GROUP  # BLOCK_H pads the group up to a legal dot size
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + seq * stride_qb + head[:, None] * stride_qh + d[None, :], mask=hmask[:, None], other=0.0)
    q = q.to(K.dtype.element_ty)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    pt_row = PageTable + seq.to(tl.int64) * stride_pt
    k_base = K + kv_head * stride_kh + d[None, :]
    v_base = V + kv_head * stride_vh + d[None, :]
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        nmask = pos < end
        k, v = load_kv_block(k_base, v_base, stride_ks, stride_vs, pt_row, pos, nmask, PAGE_SIZE)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc, v)

    # An empty split (start >= end) leaves l_i == 0; guard the division, its rows are never stored.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    if NUM_SPLITS == 1:
        out = acc / l_safe[:, None]
        o_ptr = Out + seq * stride_ob + head[:, None] * stride_oh + d[None, :]
        tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=hmask[:, None])
    else:
        row = (seq * num_q_heads + head) * NUM_SPLITS + split
        keep = hmask & (start < end)
        tl.store(PartOut + row[:, None] * HEAD_DIM + d[None, :], acc / l_safe[:, None], mask=keep[:, None])
        tl.store(PartLse + row, m_i + tl.log2(l_safe), mask=keep)


@triton.jit
def _decode_merge_kernel(
    PartOut,
    PartLse,
    SeqLens,
    Out,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.begin(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(SeqLens + seq)
    num_valid = tl.cdiv(seq_len, _split_len(seq_len, NUM_SPLITS, BLOCK_N))
    s = tl.arange(0, NUM_SPLITS)
    smask = s < num_valid
    row = (seq * tl.num_programs(1) + head) * NUM_SPLITS + s
    lse = tl.load(PartLse + row, mask=smask, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))  # split 0 is always valid, so the max is finite
    d = tl.arange(0, HEAD_DIM)
    part = tl.load(PartOut + row[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(Out + seq * stride_ob + head * stride_oh + d, out.to(Out.dtype.element_ty))


def num_kv_splits(batch_size: int, num_kv_heads: int, num_sms: int) -> int:
    """Splits per sequence: enough programs for ~4 waves over the SMs at small batch, a power of two <= 64.

    Depends on shapes only (never on sequence lengths), as CUDA-graph capture requires.
    """
    want = -(-4 * num_sms // max(1, batch_size * num_kv_heads))
    return min(_MAX_SPLITS, 1 << max(0, math.ceil(math.log2(max(1, want)))))


def decode_block_n(head_dim: int, dtype: torch.dtype) -> int:
    """Tokens per K/V block: 16-byte rows of head_dim elements, about 16 KiB per block of K."""
    return 64 if dtype.itemsize * head_dim <= 256 else 32


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    scale: float,
    num_splits: int,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each sequence's single query over its cached positions [0, seq_len).

    `out` (optional, [B, num_q_heads, head_dim] with a contiguous last dim) receives the result.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"decode attention needs a power-of-two head_dim >= 16, got {head_dim}")
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    block_n = block_n or decode_block_n(head_dim, k_cache.dtype)
    if out is None:
        out = torch.empty(batch, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    if num_splits > 1:
        part_out = torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused by the single-split kernel
    _decode_partial_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        page_table,
        seq_lens,
        part_out,
        part_lse,
        out,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        page_table.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        NUM_SPLITS=num_splits,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        **pdl.launch_args(q.device),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_merge_kernel[(batch, num_q_heads)](
            part_out,
            part_lse,
            seq_lens,
            out,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            BLOCK_N=block_n,
            num_warps=4,
            **pdl.launch_args(q.device),
        )
    return out
