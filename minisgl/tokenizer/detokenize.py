"""Incremental detokenization and stop-string matching for one generated sample.

Decoding token by token is wrong in two ways: a multi-byte UTF-8 character may be split over several
byte-level tokens (each alone decodes to U+FFFD), and some tokenizers render a token differently depending
on its left neighbour (SentencePiece's leading-space marker, byte-fallback tokens that merge). So each
step decodes a short window that starts one emitted chunk back (`prefix_offset`) and emits only what the
new tokens added beyond the window's already-emitted part; text that ends in U+FFFD is held back until the
character is complete (or the sample ends).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from minisgl.sampling_params import SamplingParams

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Invariants: `ids[:read_offset]` have been turned into text already; `ids[prefix_offset:read_offset]` is
    the context re-decoded with each new token. For tokenizers whose decode is a concatenation of token
    pieces (byte-level BPE, SentencePiece), `"".join(deltas) + flush()` == `tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: list[int]) -> str:
        """Append tokens; return the text they complete (possibly "")."""
        self.ids.extend(new_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back; call once when the sample has ended."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset >= len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT)):
            return ""  # nothing new yet (a skipped special token) or an incomplete character
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta


class StopMatcher:
    """Finds the first stop string in a sample's text and holds back text that might begin one.

    Invariant: text released by an armed `feed` never contains (nor ends with the start of) a stop string, so a
    stop split over several deltas is still cut cleanly; the released text is the text before the stop, or up to
    its end with `keep_stop`. Text fed unarmed (min_tokens not reached yet) is released whole, never searched.
    """

    def __init__(self, stops: list[str], keep_stop: bool = False):
        self.stops = [s for s in stops if s]
        self.max_len = max((len(s) for s in self.stops), default=0)
        self.keep_stop = keep_stop
        self.text = ""
        self.sent = 0  # chars of `text` released so far

    def feed(self, delta: str, final: bool = False, armed: bool = True) -> tuple[str, bool]:
        """Add `delta`; return (text to release, whether a stop string was found)."""
        start = max(self.sent, len(self.text) - self.max_len + 1)
        self.text += delta
        if self.stops and armed:
            hits = [(i, len(s)) for s, i in ((s, self.text.find(s, max(0, start))) for s in self.stops) if i >= 0]
            if hits:
                cut, length = min(hits)
                end = cut + length if self.keep_stop else cut
                out, self.sent = self.text[self.sent : end], end
                return out, True
        end = len(self.text) if final or not armed else len(self.text) - self._partial_suffix()
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out, False

    def _partial_suffix(self) -> int:
        """Length of the longest suffix of the unreleased text that is a proper prefix of a stop string."""
        tail = self.text[self.sent :]
        for k in range(min(len(tail), self.max_len - 1), 0, -1):
            if any(s.startswith(tail[-k:]) for s in self.stops):
                return k
        return 0


class SampleText:
    """One sample's text as its token outputs arrive: detokenized incrementally, then cut at the first stop string.

    The same path serves the server (tokenizer worker) and the offline API. A final token that ended the sample
    as a stop token or EOS (`hidden_ids`) is counted but not shown, as OpenAI's API leaves the stop out, unless
    `keep_stop` (SGLang's no_stop_trim) keeps stop strings and tokens. Stop strings are looked for once
    `min_tokens` tokens are out.
    """

    def __init__(
        self,
        tokenizer: Any,
        stops: list[str],
        hidden_ids: set[int],
        skip_special_tokens: bool = True,
        min_tokens: int = 0,
        keep_stop: bool = False,
    ):
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stop = StopMatcher(stops, keep_stop)
        self.hidden_ids = set() if keep_stop else hidden_ids
        self.min_tokens = min_tokens
        self.tokens = 0  # fed so far, hidden ones included: the sample's completion tokens

    def feed(self, token_ids: list[int], finished: bool, finish_reason: str | None) -> tuple[str, bool]:
        """The text these tokens release, and whether it ran into a stop string (the sample then ends there)."""
        self.tokens += len(token_ids)
        if finished and finish_reason == "stop" and token_ids and token_ids[-1] in self.hidden_ids:
            token_ids = token_ids[:-1]
        delta = self.detok.add(token_ids)
        if finished:
            delta += self.detok.flush()
        return self.stop.feed(delta, final=finished, armed=self.tokens >= self.min_tokens)

    @classmethod
    def for_params(
        cls, tokenizer: Any, params: SamplingParams, eos_ids: Iterable[int], skip_special_tokens: bool = True
    ) -> SampleText:
        return cls(
            tokenizer,
            params.stop,
            set(params.ending_ids(eos_ids)),
            skip_special_tokens,
            params.min_tokens,
            params.no_stop_trim,
        )
