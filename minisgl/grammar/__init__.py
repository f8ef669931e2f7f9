"""Constrained decoding: grammar backends behind one interface (base.py), chosen by name, and the compile pool."""

from __future__ import annotations

from typing import Any

from minisgl.grammar.base import KINDS, GrammarBackend, GrammarError, GrammarSpec, Matcher, bitmask_width
from minisgl.grammar.compiler import GrammarCompiler

BACKENDS = ("xgrammar", "llguidance", "none")


def create_backend(name: str, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> GrammarBackend:
    """The backend called `name` for this tokenizer; the model's `vocab_size` (its logits' width) may exceed
    the tokenizer's, and the extra ids are never allowed."""
    try:
        if name == "xgrammar":
            from minisgl.grammar.xgrammar_backend import XGrammarBackend

            return XGrammarBackend(tokenizer, vocab_size, stop_token_ids)
        if name == "llguidance":
            from minisgl.grammar.llguidance_backend import LLGuidanceBackend

            return LLGuidanceBackend(tokenizer, vocab_size, stop_token_ids)
    except ImportError as e:
        raise RuntimeError(
            f"the {name} grammar backend is not installed ({e}); pip install 'minisgl[grammar]', "
            "or serve with --grammar-backend none to refuse structured output"
        ) from None
    raise ValueError(f"unknown grammar backend {name!r}; choose one of {', '.join(b for b in BACKENDS if b != 'none')}")


__all__ = [
    "BACKENDS",
    "KINDS",
    "GrammarBackend",
    "GrammarCompiler",
    "GrammarError",
    "GrammarSpec",
    "Matcher",
    "bitmask_width",
    "create_backend",
]
