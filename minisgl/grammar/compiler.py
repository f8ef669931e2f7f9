"""Grammar compilation off the scheduler's critical path: a thread pool, results cached by (kind, text)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from minisgl.grammar.base import GrammarBackend, GrammarSpec

CACHE_SIZE = 1024  # compiled grammars kept (a JSON-schema grammar is tens of KB)


class GrammarCompiler:
    """Compiles `GrammarSpec`s on worker threads. `submit` never blocks: the backend itself (which loads
    the tokenizer's vocabulary) is built by the first task. Failed compilations are cached too, so a
    client repeating a bad schema gets the same error without another attempt."""

    def __init__(self, make_backend: Callable[[], GrammarBackend], threads: int = 2):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grammar")
        self._backend: Future = self._pool.submit(make_backend)
        self._cache: OrderedDict[GrammarSpec, Future] = OrderedDict()

    @property
    def backend(self) -> GrammarBackend:
        return self._backend.result()

    def submit(self, spec: GrammarSpec) -> Future:
        fut = self._cache.get(spec)
        if fut is not None:
            self._cache.move_to_end(spec)
            return fut
        fut = self._pool.submit(self._compile, spec)
        self._cache[spec] = fut
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return fut

    def _compile(self, spec: GrammarSpec) -> Any:
        return self._backend.result().compile(spec)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
