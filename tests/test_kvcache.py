"""Unit tests of the page allocator, the radix cache and the request-page manager."""

from __future__ import annotations

import random

import pytest
import torch

from minisgl.kvcache.naive import NoPrefixCache
from minisgl.kvcache.pool import PageAllocator
from minisgl.kvcache.radix import RadixCache
from minisgl.sampling_params import SamplingParams
from minisgl.scheduler.kv_manager import KVManager
from minisgl.scheduler.req import Req


def test_allocator_all_or_nothing_and_page_zero_reserved():
    a = PageAllocator(9)
    assert a.capacity == 8 and a.num_free == 8
    pages = a.alloc(5)
    assert len(set(pages)) == 5 and 0 not in pages
    assert a.alloc(4) is None and a.num_free == 3  # a failed alloc takes nothing
    rest = a.alloc(3)
    assert sorted(pages + rest) == list(range(1, 9))
    a.free(pages + rest)
    assert a.num_free == 8


def test_radix_match_insert_split():
    c = RadixCache(page_size=1)
    assert c.insert([1, 2, 3, 4], [10, 11, 12, 13]) == 0
    m = c.match([1, 2, 3, 4, 5])
    assert m.pages == [10, 11, 12, 13] and m.num_tokens == 4
    # A diverging insert splits the edge and keeps the shared part's pages.
    assert c.insert([1, 2, 9, 9], [20, 21, 22, 23]) == 2
    assert c.match([1, 2, 9, 9]).pages == [10, 11, 22, 23]
    assert c.match([1, 2, 3]).pages == [10, 11, 12]
    assert c.match([7]).num_tokens == 0
    assert c.num_pages == 6


def test_radix_page_granularity():
    c = RadixCache(page_size=4)
    c.insert(list(range(8)), [5, 6])
    m = c.match(list(range(7)))  # only whole pages can match
    assert m.pages == [5] and m.num_tokens == 4
    m = c.match([0, 1, 2, 3, 4, 5, 99, 99, 1])
    assert m.pages == [5] and m.num_tokens == 4
    assert c.insert([0, 1, 2, 3, 9, 9, 9, 9], [7, 8]) == 4  # page 7 duplicates page 5's tokens
    assert c.match([0, 1, 2, 3, 9, 9, 9, 9]).pages == [5, 8]


def test_radix_lock_blocks_eviction_and_lru_order():
    c = RadixCache(page_size=1)
    c.insert([1, 2], [1, 2])
    c.insert([3, 4], [3, 4])
    c.insert([5, 6], [5, 6])
    held = c.match([3, 4])
    c.lock(held.handle)
    c.match([1, 2])  # touch: [5, 6] is now least recently used
    assert c.num_evictable_pages == 4
    assert sorted(c.evict(2)) == [5, 6]
    assert sorted(c.evict(10)) == [1, 2]  # the locked path survives
    assert c.num_pages == 2 and c.num_evictable_pages == 0
    c.unlock(held.handle)
    assert sorted(c.evict(10)) == [3, 4] and c.num_pages == 0


def test_radix_evicts_parents_after_children():
    c = RadixCache(page_size=1)
    c.insert([1, 2, 3], [1, 2, 3])
    c.insert([1, 2, 4], [1, 2, 4])  # split: [1,2] -> {[3], [4]}
    assert sorted(c.evict(10)) == [1, 2, 3, 4]


def test_radix_random_against_model():
    """Random inserts/matches against a dict of every inserted sequence's prefixes."""
    rng = random.Random(0)
    c = RadixCache(page_size=2)
    owner: dict[tuple[int, ...], int] = {}  # prefix of whole pages -> the page covering its last 2 tokens
    next_page = 1
    for _ in range(300):
        seq = [rng.randrange(3) for _ in range(2 * rng.randint(1, 6))]
        pages = list(range(next_page, next_page + len(seq) // 2))
        next_page += len(pages)
        had = c.insert(seq, pages)
        expect_had = 0
        while expect_had < len(seq) and tuple(seq[: expect_had + 2]) in owner:
            expect_had += 2
        assert had == expect_had
        for i in range(had // 2, len(pages)):
            owner[tuple(seq[: 2 * i + 2])] = pages[i]
        m = c.match(seq)
        assert m.pages == [owner[tuple(seq[: 2 * i + 2])] for i in range(len(pages))]


def _req(ids: list[int]) -> Req:
    return Req("r", 0, ids, SamplingParams(), 0, 10_000)


@pytest.mark.parametrize("radix", [True, False])
def test_manager_returns_every_page(radix):
    kv = KVManager(num_pages=64, page_size=4, max_rows=8, max_pages_per_row=32, device=torch.device("cpu"), radix=radix)
    reqs = [_req(list(range(i, i + 30))) for i in range(3)] + [_req(list(range(30)))]
    for r in reqs:
        kv.admit(r)
        assert kv.reserve(r, r.seq_len)
        r.num_computed = r.seq_len
        row = kv.page_table[r.row, : len(r.pages)].tolist()
        assert row == r.pages
    for r in reqs:
        kv.release(r)
    kv.check_no_leaks()
    again = _req(list(range(30)) + [99])
    kv.admit(again)
    assert again.num_computed == (28 if radix else 0)  # whole pages of the cached 30-token prompt
    kv.release(again)
    kv.check_no_leaks()
    freed = kv.cache.evict(10_000)
    kv.allocator.free(freed)
    assert kv.allocator.num_free == kv.capacity


def test_manager_reserve_fails_cleanly_when_full():
    kv = KVManager(num_pages=5, page_size=2, max_rows=4, max_pages_per_row=8, device=torch.device("cpu"), radix=True)
    a, b = _req(list(range(6))), _req(list(range(100, 106)))
    kv.admit(a)
    assert kv.reserve(a, 6)
    kv.admit(b)
    free_before = kv.allocator.num_free
    assert not kv.reserve(b, 6)
    assert kv.allocator.num_free == free_before and b.own_pages == []
    kv.release(a)
    kv.release(b)
    assert kv.allocator.num_free == kv.capacity  # nothing computed, so nothing cached


def test_no_prefix_cache_keeps_nothing():
    c = NoPrefixCache(page_size=1)
    assert c.insert([1, 2], [1, 2]) == 2 and c.match([1, 2]).num_tokens == 0 and c.num_pages == 0
