"""No prefix sharing: every request computes its whole prompt (`disable_radix_cache=True`)."""

from __future__ import annotations

from typing import Any

from minisgl.kvcache.base import Match, PrefixCache


class NoPrefixCache(PrefixCache):
    """Keeps nothing: matches are always empty and inserted pages go straight back to the caller."""

    def __init__(self, page_size: int):
        self.page_size = page_size

    def match(self, tokens: list[int]) -> Match:
        return Match(None, [], 0)

    def insert(self, tokens: list[int], pages: list[int]) -> int:
        return len(tokens)  # "already had" all of them: the caller frees every page it owns

    def lock(self, handle: Any) -> None:
        pass

    def unlock(self, handle: Any) -> None:
        pass

    def evict(self, num_pages: int) -> list[int]:
        return []

    @property
    def num_pages(self) -> int:
        return 0

    @property
    def num_evictable_pages(self) -> int:
        return 0
