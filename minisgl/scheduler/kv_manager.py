"""Gives requests KV pages and page-table rows, and takes them back into the prefix cache."""

from __future__ import annotations

import torch

from minisgl.core.transfer import to_device
from minisgl.kvcache.base import PrefixCache
from minisgl.kvcache.naive import NoPrefixCache
from minisgl.kvcache.pool import PageAllocator
from minisgl.kvcache.radix import RadixCache
from minisgl.scheduler.req import Req


class KVManager:
    """The single owner of the page allocator, the prefix cache and the request->page table.

    Every page is in exactly one place: the free list, the prefix cache, or one request's `own_pages`.
    `check_no_leaks()` verifies that once no request holds pages.

    Page-table writes are queued and applied together when `page_table` is read: at page size 1 every
    running request gets a new page every step, and one scatter beats hundreds of tiny device copies.
    """

    def __init__(
        self, num_pages: int, page_size: int, max_rows: int, max_pages_per_row: int, device: torch.device, radix: bool
    ):
        self.page_size = page_size
        self.allocator = PageAllocator(num_pages)
        self.cache: PrefixCache = RadixCache(page_size) if radix else NoPrefixCache(page_size)
        self._table = torch.zeros(max_rows, max_pages_per_row, dtype=torch.int32, device=device)
        self._queued: dict[tuple[int, int], int] = {}  # (row, column) -> page; a later write wins
        self._free_rows = list(range(max_rows - 1, -1, -1))

    @property
    def page_table(self) -> torch.Tensor:
        """[max_rows, max_pages_per_row] int32: row `req.row` lists req's pages; queued writes applied."""
        if self._queued:
            device = self._table.device
            rows, cols = zip(*self._queued)
            idx = (to_device(list(rows), torch.int64, device), to_device(list(cols), torch.int64, device))
            self._table.index_put_(idx, to_device(list(self._queued.values()), torch.int32, device))
            self._queued = {}
        return self._table

    @property
    def capacity(self) -> int:
        return self.allocator.capacity

    @property
    def available_pages(self) -> int:
        """Pages that could be handed out now, evicting unlocked cache entries if need be."""
        return self.allocator.num_free + self.cache.num_evictable_pages

    @property
    def used_pages(self) -> int:
        return self.allocator.capacity - self.allocator.num_free

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def admit(self, req: Req) -> None:
        """Give `req` a page-table row and whatever prefix of its tokens the cache already holds (none while it
        wants prompt logprobs: every prompt position's logits are computed then). At least one token is left
        to compute: its logits are what the prefill is for."""
        assert req.row < 0, "request already admitted"
        req.row = self._free_rows.pop()
        match = self.cache.match([] if req.wants_prompt_logprobs else req.all_ids[:-1])
        self.cache.lock(match.handle)
        req.handle, req.cached_pages, req.own_pages = match.handle, list(match.pages), []
        req.num_computed = match.num_tokens
        self._write_row(req, 0, req.cached_pages)

    def reserve(self, req: Req, num_tokens: int) -> bool:
        """Make req's pages cover positions [0, num_tokens). False (nothing allocated) when memory is short."""
        start = req.num_pages
        need = self.pages_for(num_tokens) - start
        if need <= 0:
            return True
        pages = self._alloc(need)
        if pages is None:
            return False
        req.own_pages.extend(pages)
        self._write_row(req, start, pages)
        return True

    def _alloc(self, n: int) -> list[int] | None:
        short = n - self.allocator.num_free
        if short > 0:
            self.allocator.free(self.cache.evict(short))
        return self.allocator.alloc(n)

    def release(self, req: Req) -> None:
        """Hand req's computed pages to the prefix cache, free the rest, drop its lock and row."""
        if req.row < 0:
            return
        self._give_to_cache(req)
        self.allocator.free(req.own_pages)
        self.cache.unlock(req.handle)
        req.handle, req.cached_pages, req.own_pages = None, [], []
        self._free_rows.append(req.row)
        req.row = -1

    def cache_progress(self, req: Req) -> None:
        """Publish req's computed full pages to the cache while it keeps running (so siblings can share them)."""
        if isinstance(self.cache, NoPrefixCache):
            return
        self._give_to_cache(req)
        match = self.cache.match(req.all_ids[: req.num_computed - req.num_computed % self.page_size])
        self.cache.lock(match.handle)
        self.cache.unlock(req.handle)
        assert len(match.pages) == len(req.cached_pages)
        req.handle, req.cached_pages = match.handle, list(match.pages)
        self._write_row(req, 0, req.pages)

    def _give_to_cache(self, req: Req) -> None:
        """Insert the full computed pages. Afterwards `own_pages` is the partial tail the cache did not take;
        `cached_pages` is only meaningful again after a fresh match (duplicates in it have been freed)."""
        ps = self.page_size
        n_full = req.num_computed // ps
        pages = req.pages
        already = self.cache.insert(req.all_ids[: n_full * ps], pages[:n_full]) // ps
        # The cache already held pages [0, already); ours in that range beyond what we matched are duplicates.
        self.allocator.free(pages[len(req.cached_pages) : already])
        req.cached_pages, req.own_pages = pages[:n_full], pages[n_full:]

    def _write_row(self, req: Req, start: int, pages: list[int]) -> None:
        """Queue page_table[req.row, start + i] = pages[i]."""
        row = req.row
        for i, page in enumerate(pages, start):
            self._queued[row, i] = page

    def check_no_leaks(self) -> None:
        """Assert the page accounting closes: free + cached == capacity (call when no request holds pages)."""
        held = self.allocator.num_free + self.cache.num_pages
        assert held == self.allocator.capacity, f"page leak: {held} of {self.allocator.capacity} pages accounted for"
        assert self.cache.num_evictable_pages == self.cache.num_pages, "a cache entry is still locked"
