"""Device-side address arithmetic of the paged KV pool, shared by the attention kernels.

Layout contract (see `minisgl.kvcache.pool.KVPool`): position p of a sequence lives in slot
`page_table_row[p // page_size] * page_size + p % page_size` of the per-layer [slots, kv_heads, head_dim]
K and V tensors.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def page_slots(page_table_row, pos, mask, PAGE_SIZE: tl.constexpr):
    """KV slots (int64, so slot * stride never overflows) of positions `pos`; masked lanes get slot 0."""
    page = tl.load(page_table_row + pos // PAGE_SIZE, mask=mask, other=0).to(tl.int64)
    return page * PAGE_SIZE + pos % PAGE_SIZE


@triton.jit
def load_kv_block(k_base, v_base, stride_ks, stride_vs, page_table_row, pos, mask, PAGE_SIZE: tl.constexpr):
    """K and V rows [N, head_dim] of positions `pos` (bases already offset to the kv head and the dims);
    masked rows read as 0 from the scratch slot's address and are never fetched."""
    slot = page_slots(page_table_row, pos, mask, PAGE_SIZE)
    k = tl.load(k_base + slot[:, None] * stride_ks, mask=mask[:, None], other=0.0)
    v = tl.load(v_base + slot[:, None] * stride_vs, mask=mask[:, None], other=0.0)
    return k, v


@triton.jit
def online_softmax_step(scores, m_i, l_i, acc, v):
    """Fold one block of base-2 scores [M, N] and its values [N, D] into the running (max, sum, output).

    Masked scores must be -inf; every row must already have (or get here) one finite score, so the
    running max is finite after the first block and no exp(-inf - -inf) arises.
    """
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return m_new, l_i, acc
