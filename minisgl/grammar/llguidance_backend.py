"""The llguidance backend (no dependencies; computes each mask lazily from an Earley parser)."""

from __future__ import annotations

from typing import Any

import torch

from minisgl.grammar.base import GrammarBackend, GrammarError, GrammarSpec, Matcher


class LLGuidanceMatcher(Matcher):
    def __init__(self, matcher: Any, torch_mod: Any):
        self._m = matcher
        self._t = torch_mod

    def accept(self, token: int) -> bool:
        return bool(self._m.consume_token(token)) and not self._m.is_error()

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        self._t.fill_next_token_bitmask(self._m, bitmask, row)

    @property
    def terminated(self) -> bool:
        return bool(self._m.is_stopped())


class LLGuidanceBackend(GrammarBackend):
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]):
        super().__init__(tokenizer, vocab_size, stop_token_ids)
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self._ll = llguidance
        self._torch = llguidance.torch
        eos = self.stop_token_ids[0] if self.stop_token_ids else None
        self._tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)

    def compile(self, spec: GrammarSpec) -> Any:
        M = self._ll.LLMatcher
        try:
            if spec.kind == "json_schema":
                grammar = M.grammar_from_json_schema(spec.text, defaults={"whitespace_flexible": False})
            elif spec.kind == "json_object":
                grammar = M.grammar_from_json_schema('{"type": "object"}', defaults={"whitespace_flexible": False})
            elif spec.kind == "regex":
                grammar = M.grammar_from_regex(spec.text)
            elif spec.kind == "ebnf":
                grammar = self._ll.grammar_from("ebnf", spec.text)
            else:
                raise GrammarError(
                    f"the llguidance backend does not support {spec.kind}; use --grammar-backend xgrammar"
                )
            message = M.validate_grammar(grammar, self._tok)  # "" when valid
        except GrammarError:
            raise
        except Exception as e:
            raise GrammarError(f"invalid {spec.kind}: {e}") from None
        if message:
            raise GrammarError(f"invalid {spec.kind}: {message.strip().splitlines()[0]}")
        return grammar

    def matcher(self, compiled: Any) -> Matcher:
        return LLGuidanceMatcher(self._ll.LLMatcher(self._tok, compiled), self._torch)
