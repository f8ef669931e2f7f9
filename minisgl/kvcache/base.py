"""The prefix-cache interface the scheduler talks to."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, NamedTuple


class Match(NamedTuple):
    """A cached prefix: `pages` hold the KV of the first `num_tokens` tokens (a multiple of page_size).
    `handle` must be locked before the pages are used and unlocked when the request lets go of them."""

    handle: Any
    pages: list[int]
    num_tokens: int


class PrefixCache(ABC):
    """Owns the pages of cached prefixes. Requests own the rest of their pages.

    Contract: `insert(tokens, pages)` offers the KV of `tokens` (len == len(pages) * page_size); the cache
    keeps what it did not have and returns how many leading tokens it already had. The caller still owns
    the pages that cover those tokens, unless they are the very pages it matched earlier, and must free them.
    `evict(n)` returns up to n pages of unlocked prefixes (least recently used first) to the caller.
    """

    page_size: int

    @abstractmethod
    def match(self, tokens: list[int]) -> Match: ...

    @abstractmethod
    def insert(self, tokens: list[int], pages: list[int]) -> int: ...

    @abstractmethod
    def lock(self, handle: Any) -> None: ...

    @abstractmethod
    def unlock(self, handle: Any) -> None: ...

    @abstractmethod
    def evict(self, num_pages: int) -> list[int]: ...

    @property
    @abstractmethod
    def num_pages(self) -> int:
        """Pages currently held by the cache (locked or not)."""

    @property
    @abstractmethod
    def num_evictable_pages(self) -> int: ...
