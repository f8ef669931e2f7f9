"""User-facing sampling parameters, shared by the offline API and the server."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    temperature == 0 means greedy. top_k <= 0 and top_p == 1 and min_p == 0 disable those filters.
    Penalties follow the usual conventions: `repetition_penalty` is the multiplicative CTRL/HF penalty over
    prompt and output tokens; `frequency_penalty`/`presence_penalty` are OpenAI's additive penalties over the
    output tokens only. `logit_bias` (OpenAI's) maps token ids to values in [-100, 100] added to those tokens'
    logits before anything else (-100 in effect bans a token, +100 forces it). `seed` makes a request
    reproducible whatever else shares its batch.

    `min_tokens` (vLLM's, SGLang's min_new_tokens): until that many tokens are out, EOS and `stop_token_ids`
    cannot be sampled and stop strings are not looked for. `no_stop_trim` (SGLang's; vLLM's
    include_stop_str_in_output) keeps the stop string or stop token that ended the output in its text.
    `prompt_logprobs` (vLLM's): the log-probability of each prompt token after the first, with that many
    alternatives, computed over the whole prompt (the prefix cache is not used for it).

    Structured output (SGLang's fields; at most one may be set): `json_schema` (a JSON Schema as a string),
    `json_object` (any JSON object), `regex`, `ebnf` (GBNF-style, `root ::= ...`) or `structural_tag`
    (xgrammar's structural-tag JSON). The output is then guaranteed to match; the request ends ("stop") when
    the grammar is complete.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    no_stop_trim: bool = False
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    json_object: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})
        if isinstance(self.json_schema, dict):  # the offline API takes the schema itself too
            self.json_schema = json.dumps(self.json_schema)

    def validate(self) -> None:
        """Raise ValueError naming the first parameter that is out of range."""
        checks = [
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k == -1 or self.top_k >= 0, "must be -1 (disabled) or >= 0"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, f"must be in [0, max_tokens={self.max_tokens}]"),
            ("n", self.n >= 1, "must be >= 1"),
            ("top_logprobs", 0 <= self.top_logprobs <= 20, "must be in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "must be in [0, 20]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias!r} for token {token}")
        set_ = [k for k in _GRAMMAR_FIELDS if _is_set(self, k)]
        if len(set_) > 1:
            raise ValueError(f"{set_[0]} cannot be combined with {set_[1]}: give at most one output constraint")
        for k in set_:
            if k != "json_object" and not isinstance(getattr(self, k), str):
                raise ValueError(f"{k} must be a string")
        if set_ and self.min_tokens:  # the grammar may allow only the end before min_tokens: no token left
            raise ValueError(f"min_tokens cannot be combined with {set_[0]}: the grammar decides where the output ends")

    @property
    def grammar(self) -> tuple[str, str] | None:
        """(kind, text) of the output constraint, or None."""
        for k in _GRAMMAR_FIELDS:
            if _is_set(self, k):
                return (k, "") if k == "json_object" else (k, getattr(self, k))
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def ending_ids(self, eos_ids: Iterable[int]) -> list[int]:
        """The tokens that end the output when sampled: stop_token_ids, and the model's EOS unless ignore_eos."""
        return sorted(set(self.stop_token_ids) | (set() if self.ignore_eos else set(eos_ids)))

    @property
    def penalised(self) -> bool:
        """Whether any penalty is on (sampling then needs the prompt and output token ids)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


# Each stop string is looked for in each sample's text at every token, by the one process that detokenizes every
# request: thousands of them in one request would slow every other request's stream.
MAX_STOP_STRINGS = 64
_GRAMMAR_FIELDS = ("json_schema", "json_object", "regex", "ebnf", "structural_tag")


def _is_set(p: SamplingParams, name: str) -> bool:
    return bool(p.json_object) if name == "json_object" else getattr(p, name) is not None
