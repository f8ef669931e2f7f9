"""Radix tree over token ids whose edges carry KV pages: shared prefixes are computed once."""

from __future__ import annotations

import heapq
import itertools
from typing import Any

from minisgl.kvcache.base import Match, PrefixCache


class _Node:
    __slots__ = ("key", "pages", "children", "parent", "lock_ref", "last_use")

    def __init__(self, key: tuple[int, ...], pages: list[int], parent: _Node | None):
        self.key = key  # token ids on the edge into this node; len == len(pages) * page_size
        self.pages = pages
        self.children: dict[tuple[int, ...], _Node] = {}  # keyed by the first page of the child's key
        self.parent = parent
        self.lock_ref = 0
        self.last_use = 0


class RadixCache(PrefixCache):
    """Keys are split on page boundaries, so every node owns whole pages.

    Invariants: a locked node's ancestors are locked too (lock_ref counts requests using the path);
    only unlocked leaves are evicted, least recently used first.
    """

    def __init__(self, page_size: int):
        self.page_size = page_size
        self.root = _Node((), [], None)
        self.root.lock_ref = 1  # never evicted
        self._clock = itertools.count(1)
        self._num_pages = 0
        self._locked_pages = 0

    def _first(self, key: tuple[int, ...] | list[int], i: int = 0) -> tuple[int, ...]:
        return tuple(key[i : i + self.page_size])

    def match(self, tokens: list[int]) -> Match:
        tokens = tokens[: len(tokens) - len(tokens) % self.page_size]
        node, pos, pages = self.root, 0, []
        now = next(self._clock)
        while pos < len(tokens):
            child = node.children.get(self._first(tokens, pos))
            if child is None:
                break
            n = self._common(child.key, tokens, pos)
            if n < len(child.key):
                child = self._split(child, n)
            node = child
            node.last_use = now
            pages.extend(node.pages)
            pos += n
        return Match(node, pages, pos)

    def _common(self, key: tuple[int, ...], tokens: list[int], pos: int) -> int:
        """Length of the common prefix of key and tokens[pos:], rounded down to whole pages."""
        n = 0
        limit = min(len(key), len(tokens) - pos)
        while n < limit and key[n] == tokens[pos + n]:
            n += 1
        return n - n % self.page_size

    def _split(self, node: _Node, n: int) -> _Node:
        """Cut node's edge after n tokens; returns the new upper node."""
        p = n // self.page_size
        upper = _Node(node.key[:n], node.pages[:p], node.parent)
        upper.lock_ref, upper.last_use = node.lock_ref, node.last_use
        node.parent.children[self._first(node.key)] = upper
        node.key, node.pages, node.parent = node.key[n:], node.pages[p:], upper
        upper.children[self._first(node.key)] = node
        return upper

    def insert(self, tokens: list[int], pages: list[int]) -> int:
        assert len(tokens) == len(pages) * self.page_size, "insert whole pages only"
        node, pos = self.root, 0
        now = next(self._clock)
        while pos < len(tokens):
            child = node.children.get(self._first(tokens, pos))
            if child is None:
                new = _Node(tuple(tokens[pos:]), pages[pos // self.page_size :], node)
                new.last_use = now
                node.children[self._first(new.key)] = new
                self._num_pages += len(new.pages)
                return pos
            n = self._common(child.key, tokens, pos)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_use = now
            node, pos = child, pos + n
        return pos

    def lock(self, handle: Any) -> None:
        node: _Node | None = handle
        while node is not None and node is not self.root:
            if node.lock_ref == 0:
                self._locked_pages += len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, handle: Any) -> None:
        node: _Node | None = handle
        while node is not None and node is not self.root:
            assert node.lock_ref > 0, "unlock without lock"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._locked_pages -= len(node.pages)
            node = node.parent

    def evict(self, num_pages: int) -> list[int]:
        leaves = [(n.last_use, id(n), n) for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(leaves)
        freed: list[int] = []
        while leaves and len(freed) < num_pages:
            _, _, node = heapq.heappop(leaves)
            freed.extend(node.pages)
            self._num_pages -= len(node.pages)
            parent = node.parent
            del parent.children[self._first(node.key)]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, (parent.last_use, id(parent), parent))
        return freed

    def _nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node is not self.root:
                yield node
            stack.extend(node.children.values())

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def num_evictable_pages(self) -> int:
        return self._num_pages - self._locked_pages
