"""The grammar queue: constrained requests wait here while their grammar compiles, then join the waiting queue.

Invariants: a request is in exactly one of the grammar queue, the waiting queue or the running list; it
leaves the grammar queue with a matcher per sample (n > 1: one each), or with an error when its grammar
cannot compile or does not compile within `timeout` seconds.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import torch

from minisgl.core.transfer import to_device
from minisgl.engine.sampling import PendingTokens, TokenMask
from minisgl.grammar import GrammarCompiler, GrammarError, GrammarSpec, bitmask_width
from minisgl.scheduler.req import Req


class Verdict(NamedTuple):
    """What a matcher made of one sampled token."""

    accepted: bool  # False: the grammar does not allow it (the mask did, so a backend bug)
    terminated: bool  # the grammar is complete: the sample is done


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
        self._thread = ThreadPoolExecutor(1, "grammar-step")
        self._accepting: tuple[list[Req], cf.Future] | None = None  # begun by begin_accept, for these requests
        self._filling: tuple[list[Req], cf.Future] | None = None  # begun by begin_fill
        self._host: torch.Tensor | None = None  # the masks' buffers, see _buffers
        self._dev: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

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

    # ---- each step: advance the matchers by the sampled tokens, fill the masks of the next sample ----------
    # Under overlap scheduling both run on the grammar thread while this thread launches the next forward and
    # reads the previous step's outputs: xgrammar releases the GIL in its calls, so they cost the step little
    # of its time. `begin_*` start them; `accept` and `token_mask` collect them (or do the work here when
    # nothing was begun for those requests).

    def begin_accept(self, reqs: list[Req], tokens: PendingTokens) -> None:
        """Start `accept` for a step still in flight: the grammar thread waits for its tokens itself."""
        if any(r.grammar is not None for r in reqs):
            self._accepting = (reqs, self._thread.submit(lambda: self._accept(reqs, tokens.wait().token_ids)))

    def begin_fill(self, reqs: list[Req], device: torch.device) -> None:
        """Start `token_mask(reqs, device)`; runs after any `begin_accept` before it."""
        if any(r.grammar is not None for r in reqs):
            self._filling = (reqs, self._thread.submit(self._fill, reqs, device))

    def accept(self, reqs: list[Req], tokens: list[int]) -> list[Verdict | None]:
        """Advance the matcher of every unfinished constrained sample among `reqs` by its token (stop tokens
        too, which keeps the matcher's state consistent for retraction), all in one backend call. Per row:
        the grammar's verdict, None for rows without a grammar."""
        begun, self._accepting = self._accepting, None
        return begun[1].result() if begun is not None and begun[0] is reqs else self._accept(reqs, tokens)

    def token_mask(self, reqs: list[Req], device: torch.device) -> TokenMask | None:
        """The bitmask of the constrained rows among `reqs` (a batch about to be sampled), or None. Valid until
        the next step's: its buffers are reused (rows of unconstrained samples hold stale bits, which a
        TokenMask never reads)."""
        begun, self._filling = self._filling, None
        rows = begun[1].result() if begun is not None and begun[0] is reqs else self._fill(reqs, device)
        if not rows:
            return None
        n = len(reqs)
        if self._dev is not None:
            # From pinned memory, so the copy queues behind the forward (core/transfer.py); the event tells the
            # next fill when the host buffer may be written again.
            self._dev[:n].copy_(self._host[:n], non_blocking=True)
            self._copied.record()
        bitmask = self._host if self._dev is None else self._dev
        return TokenMask(bitmask[:n], to_device(rows, torch.int64, device), rows)

    def _accept(self, reqs: list[Req], tokens: list[int]) -> list[Verdict | None]:
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None and not r.finished]
        out: list[Verdict | None] = [None] * len(reqs)
        if rows:
            ok = self.compiler.backend.accept_tokens([reqs[i].grammar for i in rows], [tokens[i] for i in rows])
            for i, a in zip(rows, ok):
                out[i] = Verdict(a, reqs[i].grammar.terminated)
        return out

    def _fill(self, reqs: list[Req], device: torch.device) -> list[int]:
        """Fill the host bitmask's rows of the constrained samples among `reqs` that may still take a token."""
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None and not r.finished and not r.grammar.terminated]
        if rows:
            self._buffers(len(reqs), device)
            self.compiler.backend.fill_masks([reqs[i].grammar for i in rows], self._host, rows)
        return rows

    def _buffers(self, n: int, device: torch.device) -> None:
        """A host bitmask of at least `n` rows (pinned when the logits live on a GPU), and its twin on `device`.
        Allocated once and regrown by doubling: filling a fresh [n, vocab / 32] tensor and pinning it every step
        cost more than the grammar work itself on a 16-core GPU host."""
        cuda = device.type == "cuda"
        if self._host is None or self._host.shape[0] < n:
            width = bitmask_width(self.compiler.backend.vocab_size)
            rows = max(n, 2 * self._host.shape[0] if self._host is not None else 16)
            self._host = torch.empty((rows, width), dtype=torch.int32, pin_memory=cuda)
            self._dev = torch.empty((rows, width), dtype=torch.int32, device=device) if cuda else None
            self._copied = torch.cuda.Event() if cuda else None
        elif self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has long run by now: returns at once
