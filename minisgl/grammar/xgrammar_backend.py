"""The xgrammar backend (the default of SGLang and vLLM): pushdown automata with precomputed token masks."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from minisgl.core.cpu_threads import default_threads
from minisgl.grammar.base import GrammarBackend, GrammarError, GrammarSpec, Matcher

# Fewer matchers than this per thread and the hand-off between threads costs more than the work it spreads.
MIN_ROWS_PER_THREAD = 8
# A step's matchers advance on at most this many threads: past it the threads mostly wait for one another
# (benchmark/grammar_host.py on a 16-core GPU host).
MAX_STEP_THREADS = 4


class XGrammarMatcher(Matcher):
    def __init__(self, matcher: Any, stop_token_ids: frozenset[int]):
        self._m = matcher
        self._stops = stop_token_ids
        self._terminated = False

    def accept(self, token: int) -> bool:
        return self.accepted(token, bool(self._m.accept_token(token)))

    def accepted(self, token: int, ok: bool) -> bool:
        """Note that the matcher took (or refused) `token`. It terminates only by accepting a stop token
        (xgrammar's default), so `terminated` is known here without asking the matcher: each question costs
        a call into the library, a batch of them per step."""
        self._terminated |= ok and token in self._stops
        return ok

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    @property
    def terminated(self) -> bool:
        return self._terminated


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]):
        super().__init__(tokenizer, vocab_size, stop_token_ids)
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids)
        self._stops = frozenset(info.stop_token_ids)
        # Compilation already runs on our own pool; one thread each keeps it off the cores the model uses.
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._batch = xgr.BatchGrammarMatcher(max_threads="auto")  # fills the masks of new requests
        # Accepting a token walks its bytes through the parser and costs more than the mask fill after it.
        # xgrammar runs each batch call on one thread with the GIL released, so `advance` gives slices of the
        # step's matchers to threads of our own, each accepting then filling its slice (the calling thread
        # takes the first).
        self._threads = min(MAX_STEP_THREADS, default_threads())
        self._pool = ThreadPoolExecutor(max(1, self._threads - 1), "grammar-advance")
        self._local = threading.local()  # each thread's own batch filler

    def compile(self, spec: GrammarSpec) -> Any:
        c = self._compiler
        try:
            if spec.kind == "json_schema":
                # Compact JSON: with free whitespace a small model can spend its whole budget on newlines.
                return c.compile_json_schema(spec.text, any_whitespace=False)
            if spec.kind == "json_object":  # OpenAI's json_object: an object, not any JSON value
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.kind == "regex":
                return c.compile_regex(spec.text)
            if spec.kind == "ebnf":
                return c.compile_grammar(spec.text)
            if spec.kind == "structural_tag":
                return c.compile_structural_tag(
                    json.loads(spec.text) if spec.text.lstrip().startswith("{") else spec.text
                )
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with its parser's message
            raise GrammarError(f"invalid {spec.kind}: {_first_line(e)}") from None
        raise GrammarError(f"the xgrammar backend does not support {spec.kind}")

    def fill_masks(self, matchers: list[Matcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        self._batch.batch_fill_next_token_bitmask([m._m for m in matchers], bitmask, rows)

    def advance(self, matchers: list[Matcher], tokens: list[int], bitmask: torch.Tensor, rows: list[int]) -> list[bool]:
        parts = max(1, min(self._threads, len(matchers) // MIN_ROWS_PER_THREAD))
        size = -(-len(matchers) // parts)
        rest = [
            self._pool.submit(self._advance, matchers[i : i + size], tokens[i : i + size], bitmask, rows[i : i + size])
            for i in range(size, len(matchers), size)
        ]
        ok = self._advance(matchers[:size], tokens[:size], bitmask, rows[:size])
        for f in rest:
            ok += f.result()
        return ok

    def _advance(
        self, matchers: list[Matcher], tokens: list[int], bitmask: torch.Tensor, rows: list[int]
    ) -> list[bool]:
        accepted = self._xgr.BatchGrammarMatcher.batch_accept_token([m._m for m in matchers], tokens)
        ok = [m.accepted(t, a) for m, t, a in zip(matchers, tokens, accepted)]
        live = [i for i, a in enumerate(ok) if a and not matchers[i].terminated]
        if live:
            filler = getattr(self._local, "filler", None)
            if filler is None:
                filler = self._local.filler = self._xgr.BatchGrammarMatcher(max_threads=1)
            filler.batch_fill_next_token_bitmask([matchers[i]._m for i in live], bitmask, [rows[i] for i in live])
        return ok

    def matcher(self, compiled: Any) -> Matcher:
        return XGrammarMatcher(self._xgr.GrammarMatcher(compiled), self._stops)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    # xgrammar prefixes "[time] /path/file.cc:line: "; the client needs only the message.
    if text.startswith("[") and ": " in text:
        text = text.split(": ", 1)[1]
    return text.splitlines()[0] if text else type(e).__name__
