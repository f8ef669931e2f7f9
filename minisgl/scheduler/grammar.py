"""The grammar queue: constrained requests wait here while their grammar compiles, then join the waiting queue.

Invariants: a request is in exactly one of the grammar queue, the waiting queue or the running list; it
leaves the grammar queue with a matcher per sample (n > 1: one each), or with an error when its grammar
cannot compile or does not compile within `timeout` seconds.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from dataclasses import dataclass

import torch

from minisgl.core.transfer import to_device
from minisgl.engine.sampling import TokenMask
from minisgl.grammar import GrammarCompiler, GrammarError, GrammarSpec
from minisgl.scheduler.req import Req


@dataclass
class _Entry:
    reqs: list[Req]
    future: cf.Future
    deadline: float


class GrammarQueue:
    def __init__(self, compiler: GrammarCompiler, timeout: float):
        self.compiler = compiler
        self.timeout = timeout
        self.entries: list[_Entry] = []

    def __len__(self) -> int:
        return len(self.entries)

    def num_reqs(self) -> int:
        return sum(len(e.reqs) for e in self.entries)

    def add(self, reqs: list[Req], spec: GrammarSpec) -> None:
        self.entries.append(_Entry(reqs, self.compiler.submit(spec), time.monotonic() + self.timeout))

    def poll(self) -> tuple[list[Req], list[tuple[Req, str]]]:
        """Requests whose grammar is ready (each with its matcher), and failed ones with their error."""
        ready: list[Req] = []
        failed: list[tuple[Req, str]] = []
        now = time.monotonic()
        keep = []
        for e in self.entries:
            if e.future.done():
                try:
                    compiled = e.future.result()
                    backend = self.compiler.backend
                    for r in e.reqs:
                        r.grammar = backend.matcher(compiled)
                    ready += e.reqs
                except GrammarError as err:
                    failed += [(r, str(err)) for r in e.reqs]
                except Exception as err:  # noqa: BLE001 - a backend failure must end the request, not the loop
                    failed += [(r, f"cannot compile the grammar: {type(err).__name__}: {err}") for r in e.reqs]
            elif now >= e.deadline:
                failed += [(r, f"the grammar did not compile within {self.timeout:g}s") for r in e.reqs]
            else:
                keep.append(e)
        self.entries = keep
        return ready, failed

    def wait(self, timeout: float) -> None:
        """Block up to `timeout` seconds for some compilation to finish (when nothing else has work)."""
        if self.entries:
            cf.wait([e.future for e in self.entries], timeout=timeout, return_when=cf.FIRST_COMPLETED)

    def abort(self, rid: str, index: int | None) -> list[Req]:
        out = []
        for e in self.entries:
            gone = [r for r in e.reqs if r.rid == rid and index in (None, r.index)]
            e.reqs = [r for r in e.reqs if r not in gone]
            out += gone
        self.entries = [e for e in self.entries if e.reqs]
        return out

    def token_mask(self, reqs: list[Req], device: torch.device) -> TokenMask | None:
        """The bitmask of the constrained rows among `reqs` (a batch about to be sampled), or None."""
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None and not r.finished and not r.grammar.terminated]
        if not rows:
            return None
        backend = self.compiler.backend
        bitmask = backend.allocate_bitmask(len(reqs))
        backend.fill_masks([reqs[i].grammar for i in rows], bitmask, rows)
        if device.type == "cuda":  # through pinned memory, so the copy queues behind the forward (core/transfer.py)
            bitmask = bitmask.pin_memory().to(device, non_blocking=True)
        return TokenMask(bitmask, to_device(rows, torch.int64, device), rows)
