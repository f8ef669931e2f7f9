"""What goes into and comes out of the scheduler. Plain data so it can cross a process boundary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from minisgl.engine.engine import Engine
    from minisgl.models.config import ModelConfig
    from minisgl.sampling_params import SamplingParams
    from minisgl.scheduler.grammar import GrammarQueue
    from minisgl.scheduler.kv_manager import KVManager


@dataclass
class TokenOutput:
    """Tokens one sample of one request produced in one scheduler step.

    `index` tells the n samples of a request apart (0..n-1). `finished` is set on the last output of a
    sample, with `finish_reason` "stop" (EOS / stop token), "length" (max_tokens or context) or "abort".
    `logprobs[i]` is the log-probability of `token_ids[i]`; `top_logprobs[i]` the alternatives as
    (token_id, logprob) pairs, best first. Both are None unless the request asked for them. `error` ends the
    sample without output (e.g. its grammar did not compile). With params.prompt_logprobs, sample 0's first
    output carries `prompt_logprobs[i]`, the log-probability of prompt token i + 1, and its alternatives.
    """

    rid: str
    index: int
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    error_status: int = 500  # the HTTP status of `error`: 400 for the client's mistake (a bad grammar)
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_ranks: list[int] | None = None  # of each prompt token among the vocabulary, 1 the most likely


@dataclass
class SchedulerStats:
    num_running_reqs: int = 0
    num_queue_reqs: int = 0
    token_usage: float = 0.0  # fraction of KV pages in use by requests or cache
    cache_hit_rate: float = 0.0  # cached prompt tokens / prompt tokens, since start
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    extra: dict = field(default_factory=dict)


class SchedulerHandle(Protocol):
    """What the scheduler's callers (the offline API, the shell, the scheduler process) use. `Scheduler` provides
    it, and so does rank 0's `TPScheduler`, which replicates each call to the other ranks."""

    engine: Engine
    model_config: ModelConfig
    max_model_len: int
    grammars: GrammarQueue | None  # None: constrained requests are refused

    @property
    def kv(self) -> KVManager: ...

    def add_request(self, rid: str, input_ids: list[int], params: SamplingParams) -> None: ...

    def abort(self, rid: str, index: int | None = None) -> None: ...

    def step(self) -> list[TokenOutput]: ...

    def has_work(self) -> bool: ...

    def stats(self) -> SchedulerStats: ...

    def shutdown(self) -> None: ...
