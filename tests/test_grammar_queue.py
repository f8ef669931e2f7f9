"""The scheduler's grammar queue on its own: readiness, compile errors, the timeout, aborts, the cache."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from minisgl.grammar import GrammarBackend, GrammarCompiler, GrammarError, GrammarSpec, Matcher
from minisgl.sampling_params import SamplingParams
from minisgl.scheduler.grammar import GrammarQueue
from minisgl.scheduler.req import Req


class _Matcher(Matcher):
    def accept(self, token: int) -> bool:
        return True

    def fill_mask(self, bitmask, row: int) -> None:
        bitmask[row] = 0

    @property
    def terminated(self) -> bool:
        return False


class _Backend(GrammarBackend):
    """Compiles "ok" at once, refuses "bad", and blocks on "slow" until released."""

    def __init__(self):
        super().__init__(None, 64, [0])
        self.release = threading.Event()
        self.compiled: list[str] = []

    def compile(self, spec: GrammarSpec):
        self.compiled.append(spec.text)
        if spec.text == "bad":
            raise GrammarError("invalid regex: bad")
        if spec.text == "slow":
            self.release.wait(10)
        return spec.text

    def matcher(self, compiled) -> Matcher:
        return _Matcher()


def _reqs(rid: str, n: int = 1) -> list[Req]:
    return [Req(rid, i, [1, 2], SamplingParams(), 0, 16) for i in range(n)]


def _poll_until(q: GrammarQueue, want: int, timeout: float = 5.0):
    ready, failed = [], []
    deadline = time.monotonic() + timeout
    while len(ready) + len(failed) < want and time.monotonic() < deadline:
        q.wait(0.05)
        r, f = q.poll()
        ready += r
        failed += f
    return ready, failed


def test_ready_failed_timeout_abort_and_cache():
    backend = _Backend()
    q = GrammarQueue(GrammarCompiler(lambda: backend), timeout=0.5, max_rows=8, device=torch.device("cpu"))
    q.add(_reqs("a", 2), GrammarSpec("regex", "ok"))
    q.add(_reqs("b"), GrammarSpec("regex", "bad"))
    q.add(_reqs("c"), GrammarSpec("regex", "slow"))
    q.add(_reqs("d"), GrammarSpec("regex", "slow"))
    q.abort("d", None)
    ready, failed = _poll_until(q, 4)
    assert sorted((r.rid, r.index) for r in ready) == [("a", 0), ("a", 1)]
    assert all(r.grammar is not None for r in ready) and ready[0].grammar is not ready[1].grammar  # one each
    assert [(r.rid, msg) for r, msg in failed] == [
        ("b", "invalid regex: bad"),
        ("c", "the grammar did not compile within 0.5s"),
    ]
    assert len(q) == 0
    backend.release.set()
    q.add(_reqs("e"), GrammarSpec("regex", "ok"))  # cached: no second compilation
    ready, _ = _poll_until(q, 1)
    assert [r.rid for r in ready] == ["e"] and backend.compiled.count("ok") == 1


def test_spec_kinds_are_checked():
    with pytest.raises(GrammarError):
        GrammarSpec("yaml", "x")
