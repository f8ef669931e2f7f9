"""Paged extend (prefill) attention: a chunk of new tokens per sequence, on top of its cached prefix.

Layouts:
- q: [T, num_q_heads, head_dim] (contiguous last dim): the new tokens of all sequences back to back, sequence b
  owning rows [cu_extend_lens[b], cu_extend_lens[b + 1]). The output has q's shape and dtype, contiguous.
- k_cache, v_cache: one layer of the pool, [slots, num_kv_heads, head_dim]; they must already hold the new
  tokens' k/v (the backend stores them first), so the kernel reads prefix and chunk alike through the page table.
- page_table: [B, >= ceil(seq_len / page_size)] int32; prefix_lens: [B] int32; cu_extend_lens: [B + 1] int32.
- Causality: new token i of sequence b sits at position prefix_lens[b] + i and sees positions <= its own.

Work is cut into tiles of BLOCK_M new tokens of one sequence (`extend_tiles`, built on the host: extend
steps are never graph-captured); the grid is (tiles, num_q_heads).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minisgl.core.transfer import to_device
from minisgl.kernels.paging import load_kv_block, online_softmax_step

_LOG2E = 1.4426950408889634


@triton.jit
def _extend_kernel(
    Q,
    K,
    V,
    Out,
    PageTable,
    PrefixLens,
    CuExtendLens,
    Tiles,
    qk_scale,
    num_tiles,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_pt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    seq = tl.load(Tiles + tile)
    m0 = tl.load(Tiles + num_tiles + tile)
    q_start = tl.load(CuExtendLens + seq)
    ext_len = tl.load(CuExtendLens + seq + 1) - q_start
    prefix = tl.load(PrefixLens + seq)

    rows = m0 + tl.arange(0, BLOCK_M)
    rmask = rows < ext_len
    d = tl.arange(0, HEAD_DIM)
    q_ptr = Q + (q_start + rows)[:, None].to(tl.int64) * stride_qt + head * stride_qh + d[None, :]
    q = tl.load(q_ptr, mask=rmask[:, None], other=0.0).to(K.dtype.element_ty)
    q_pos = prefix + rows
    # The tile's last real query sees everything before kv_end; rows past ext_len see a subset of that.
    kv_end = prefix + tl.minimum(m0 + BLOCK_M, ext_len)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    pt_row = PageTable + seq.to(tl.int64) * stride_pt
    k_base = K + kv_head * stride_kh + d[None, :]
    v_base = V + kv_head * stride_vh + d[None, :]
    for n0 in range(0, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        nmask = pos < kv_end
        k, v = load_kv_block(k_base, v_base, stride_ks, stride_vs, pt_row, pos, nmask, PAGE_SIZE)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        # Position 0 is visible to every row, so the first block gives each row a finite max.
        visible = (pos[None, :] <= q_pos[:, None]) & nmask[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc, v)

    out = acc / l_i[:, None]
    o_ptr = Out + (q_start + rows)[:, None].to(tl.int64) * stride_ot + head * stride_oh + d[None, :]
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=rmask[:, None])


def extend_blocks(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): 64 x 64 tiles for 16-bit data; fp32 (tests only) halves them to fit shared memory."""
    if dtype.itemsize >= 4 or head_dim > 128:
        return 32, 32
    return 64, 64


def extend_tiles(extend_lens: list[int], block_m: int, device: torch.device) -> torch.Tensor:
    """[2, tiles] int32: row 0 the sequence of each tile, row 1 its first new-token index (one host copy)."""
    seqs: list[int] = []
    starts: list[int] = []
    for b, n in enumerate(extend_lens):
        for m in range(0, n, block_m):
            seqs.append(b)
            starts.append(m)
    return to_device([seqs, starts], torch.int32, device)


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    cu_extend_lens: torch.Tensor,
    tiles: torch.Tensor,
    page_size: int,
    scale: float,
    block_m: int,
    block_n: int,
    num_warps: int = 4,
    num_stages: int = 2,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of every new token over its sequence's prefix and the chunk up to itself.

    `tiles` comes from `extend_tiles(extend_lens, block_m, ...)` with the same `block_m`. `out` (optional,
    q's shape with a contiguous last dim) receives the result.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    group = num_q_heads // k_cache.shape[1]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"extend attention needs a power-of-two head_dim >= 16, got {head_dim}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty(num_tokens, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    num_tiles = tiles.shape[1]
    if num_tiles == 0:
        return out
    _extend_kernel[(num_tiles, num_q_heads)](
        q,
        k_cache,
        v_cache,
        out,
        page_table,
        prefix_lens,
        cu_extend_lens,
        tiles,
        scale * _LOG2E,
        num_tiles,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        out.stride(0),
        out.stride(1),
        page_table.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
