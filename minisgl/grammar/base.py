"""The grammar-backend interface: compile a constraint once, then one matcher per sample.

A constraint is a `GrammarSpec` (kind, text). Kinds: "json_schema" (a JSON Schema document), "json_object"
(any JSON object; text ignored), "regex", "ebnf" (GBNF-style, `root ::= ...`) and "structural_tag" (xgrammar's
structural-tag JSON: free text with tagged, schema-constrained segments, used for tool calls).

Token masks are bitmasks shared by every backend: int32 [rows, ceil(vocab / 32)], bit i of word j set when
token 32 * j + i is allowed. Ids at or past the tokenizer's vocabulary (models pad their logits) are never
allowed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

KINDS = ("json_schema", "json_object", "regex", "ebnf", "structural_tag")


class GrammarError(ValueError):
    """A constraint that cannot be compiled (the client's error: answered with a 400)."""


@dataclass(frozen=True)
class GrammarSpec:
    kind: str
    text: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}; expected one of {', '.join(KINDS)}")


class Matcher(ABC):
    """One sample's position in a grammar. Advanced only by tokens the sample really accepted, so it survives
    retraction and recomputation unchanged."""

    @abstractmethod
    def accept(self, token: int) -> bool:
        """Advance by `token`; False (state unchanged) if the grammar does not allow it."""

    @abstractmethod
    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into row `row` of an int32 bitmask on the CPU."""

    @property
    @abstractmethod
    def terminated(self) -> bool:
        """The grammar is complete and has accepted its stop token: the sample is done."""


class GrammarBackend(ABC):
    """A grammar library bound to one tokenizer. `compile` may run on any thread, concurrently."""

    name: str = ""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]):
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)

    @abstractmethod
    def compile(self, spec: GrammarSpec) -> Any:
        """A compiled grammar (backend-specific, shareable between matchers). Raises GrammarError."""

    @abstractmethod
    def matcher(self, compiled: Any) -> Matcher:
        """A fresh matcher at the start of `compiled`."""

    def fill_masks(self, matchers: list[Matcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        """Fill row rows[i] of `bitmask` for matchers[i]: one step's constrained rows at once, so a backend that
        can fill them in parallel does (a batch of them per step is on the host's critical path)."""
        for m, row in zip(matchers, rows):
            m.fill_mask(bitmask, row)

    def advance(self, matchers: list[Matcher], tokens: list[int], bitmask: torch.Tensor, rows: list[int]) -> list[bool]:
        """For each i: `matchers[i].accept(tokens[i])`, then, where the token was accepted and the grammar is not
        complete, fill row rows[i] of `bitmask` for the token after it. Returns the accepts. One step's sampled
        tokens at once: the whole call is on the host's critical path, so a backend that can advance its
        matchers in parallel does."""
        ok = [m.accept(t) for m, t in zip(matchers, tokens)]
        for m, a, row in zip(matchers, ok, rows):
            if a and not m.terminated:
                m.fill_mask(bitmask, row)
        return ok


def bitmask_width(vocab_size: int) -> int:
    return -(-vocab_size // 32)
