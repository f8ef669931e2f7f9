"""Paged KV storage and the allocator that hands out its pages."""

from __future__ import annotations

import torch


class KVPool:
    """K and V tensors for every layer, addressed by token slot.

    Layout per layer: `k[layer]` and `v[layer]` are [num_pages * page_size, num_kv_heads, head_dim], so a
    slot is `page * page_size + offset`. The same memory viewed as [num_pages, page_size, heads, dim] is the
    paged layout FlashInfer expects. Page 0 is reserved as a scratch page (padding rows of a CUDA-graph batch
    write there), so usable pages are 1..num_pages-1.
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_layers, num_pages * page_size, num_kv_heads, head_dim)
        # Uninitialised on purpose: a slot is read only after it is written, except the scratch page 0
        # (masked padding reads it), which is zeroed. On the CPU this keeps untouched pages out of RSS.
        self._k = torch.empty(shape, dtype=dtype, device=self.device)
        self._v = torch.empty(shape, dtype=dtype, device=self.device)
        self._k[:, :page_size].zero_()
        self._v[:, :page_size].zero_()

    def k(self, layer: int) -> torch.Tensor:
        return self._k[layer]

    def v(self, layer: int) -> torch.Tensor:
        return self._v[layer]

    def store(self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.is_cuda:
            from minisgl.kernels.kv_store import store_kv

            return store_kv(self._k[layer], self._v[layer], loc, k, v)
        self._k[layer].index_copy_(0, loc, k.to(self.dtype))
        self._v[layer].index_copy_(0, loc, v.to(self.dtype))

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * page_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class PageAllocator:
    """A free list of page ids. Pages are owned by exactly one holder: a request or the prefix cache.

    Invariant: `num_free + pages held by requests + pages held by the prefix cache == num_pages - 1`
    (page 0 is never handed out); tests check that every page comes back.
    """

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    def alloc(self, n: int) -> list[int] | None:
        """Return n page ids, or None (and allocate nothing) when fewer than n are free."""
        if n > len(self._free):
            return None
        if n == 0:
            return []
        pages = self._free[-n:]
        del self._free[-n:]
        pages.reverse()
        return pages

    def free(self, pages: list[int]) -> None:
        self._free.extend(pages)
