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
    def __init__(self, compiler: GrammarCompiler, timeout: float, max_rows: int, device: torch.device):
        """`max_rows`: the scheduler's request rows (every `req.row` is below it); `device`: the logits'."""
        self.compiler = compiler
        self.timeout = timeout
        self.entries: list[_Entry] = []
        self._thread = ThreadPoolExecutor(1, "grammar-step")
        self._accepting: tuple[list[Req], cf.Future] | None = None  # begun by begin_accept, for these requests
        self._max_rows = max_rows
        self._device = torch.device(device)
        self._host: torch.Tensor | None = None  # the masks, by request row; see _buffers
        self._dev: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None
        self._filled: dict[int, Req] = {}  # row -> the request whose next mask that row of the buffer holds

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

    # ---- each step: advance the matchers by the sampled tokens, hand the masks of the next sample over -------
    # The masks live in a host buffer indexed by each request's row (`req.row`, fixed while it runs), so a
    # matcher fills its next mask right after accepting its token, without waiting to learn where the request
    # sits in the next batch. Under overlap scheduling both run on the grammar thread while this thread
    # launches the next forward and reads the previous step's outputs (xgrammar releases the GIL in its calls).

    def begin_accept(self, reqs: list[Req], tokens: PendingTokens) -> None:
        """Start `accept` for a step still in flight: the grammar thread waits for its tokens itself."""
        live = self._live(reqs)
        if live:
            self._accepting = (reqs, self._thread.submit(lambda: self._advance(reqs, live, tokens.wait().token_ids)))

    def accept(self, reqs: list[Req], tokens: list[int]) -> list[Verdict | None]:
        """Advance the matcher of every unfinished constrained sample among `reqs` by its token (stop tokens
        too, which keeps the matcher's state consistent for retraction) and fill the mask of its next token,
        all in one backend call. Per row: the grammar's verdict, None for rows without a grammar."""
        begun, self._accepting = self._accepting, None
        if begun is not None and begun[0] is reqs:
            return begun[1].result()
        return self._advance(reqs, self._live(reqs), tokens)

    def token_mask(self, reqs: list[Req], rows: torch.Tensor) -> TokenMask | None:
        """The bitmask of the constrained rows among `reqs` (a batch about to be sampled; `rows` their
        `req.row`s on the logits' device), or None. Valid until the next step's: its buffers are reused (rows
        of unconstrained samples hold stale bits, which a TokenMask never reads). Call only with no `accept`
        begun and not collected: the grammar thread writes the same buffer."""
        live = [(i, r, row) for i, r, row in self._live(reqs) if not r.grammar.terminated]
        if not live:
            return None
        self._buffers()
        # Requests not advanced since their last fill here: new ones, and any whose row was someone else's since.
        stale = [(r, row) for _, r, row in live if self._filled.get(row) is not r]
        if stale:
            self.compiler.backend.fill_masks([r.grammar for r, _ in stale], self._host, [row for _, row in stale])
            self._filled.update((row, r) for r, row in stale)
        if self._dev is not None:
            # From pinned memory, so the copy queues behind the forward (core/transfer.py); only the span of
            # rows in use, which the row allocator keeps low.
            lo = min(row for _, _, row in live)
            hi = max(row for _, _, row in live) + 1
            self._dev[lo:hi].copy_(self._host[lo:hi], non_blocking=True)
            self._copied.record()
        buffer = self._host if self._dev is None else self._dev
        indices = [i for i, _, _ in live]
        return TokenMask(buffer.index_select(0, rows), to_device(indices, torch.int64, self._device), indices)

    @staticmethod
    def _live(reqs: list[Req]) -> list[tuple[int, Req, int]]:
        """(index, request, row) of the unfinished constrained samples among `reqs`, read on the scheduler's
        thread: while the grammar thread advances them, that thread may finish them and give their rows away."""
        return [(i, r, r.row) for i, r in enumerate(reqs) if r.grammar is not None and not r.finished]

    def _advance(self, reqs: list[Req], live: list[tuple[int, Req, int]], tokens: list[int]) -> list[Verdict | None]:
        out: list[Verdict | None] = [None] * len(reqs)
        if not live:
            return out
        self._buffers()
        ok = self.compiler.backend.advance(
            [r.grammar for _, r, _ in live], [tokens[i] for i, _, _ in live], self._host, [row for _, _, row in live]
        )
        for (i, r, row), a in zip(live, ok):
            out[i] = Verdict(a, r.grammar.terminated)
            if a and not r.grammar.terminated:
                self._filled[row] = r
            elif self._filled.get(row) is r:
                del self._filled[row]
        return out

    def _buffers(self) -> None:
        """The host masks (pinned when the logits live on a GPU) and their twin on the device, allocated once:
        filling a fresh bitmask and pinning it every step cost more than the grammar work itself on a 16-core
        GPU host. Waits for the last copy out of the host buffer before it is written again (long done by then:
        the tokens that start a write were sampled after that copy)."""
        if self._host is None:
            cuda = self._device.type == "cuda"
            shape = (self._max_rows, bitmask_width(self.compiler.backend.vocab_size))
            self._host = torch.zeros(shape, dtype=torch.int32, pin_memory=cuda)
            self._dev = torch.zeros(shape, dtype=torch.int32, device=self._device) if cuda else None
            self._copied = torch.cuda.Event() if cuda else None
        elif self._copied is not None:
            self._copied.synchronize()
