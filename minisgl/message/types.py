"""The messages exchanged by the serving processes.

    API server --GenerateReq/AbortReq/TokenizeReq/DetokenizeReq/FlushCacheReq--> tokenizer worker
    tokenizer worker --TokenizedGenerateReq/AbortReq/FlushCacheReq--> scheduler (rank 0)
    scheduler --ModelInfo/TokenOutputBatch/ReqError/StatsMsg/FlushCacheResult--> tokenizer worker
    tokenizer worker --ModelInfo/StrOutputBatch/ReqError/StatsMsg/TokenizeResult/FlushCacheResult--> API server

Every request is identified by `rid`, unique per server; `index` tells the n samples of one request apart.
All of these are plain dataclasses so they are cheap to build and easy to read in a debugger; see codec.py
for the wire format.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minisgl.message.codec import register
from minisgl.sampling_params import SamplingParams
from minisgl.scheduler.io import SchedulerStats, TokenOutput

# The scheduler's own output types cross the wire unchanged.
register(SamplingParams)
register(TokenOutput)
register(SchedulerStats)


# ---- API server -> tokenizer worker ---------------------------------------------------------------
@register
@dataclass
class GenerateReq:
    """A prompt to generate for: exactly one of `text`, `messages` (chat, rendered with the tokenizer's chat
    template) or `input_ids` is set. `max_tokens` None means "the rest of the context". `echo` asks for
    the prompt text back on each sample's first output."""

    rid: str
    params: SamplingParams
    text: str | None = None
    messages: list[dict] | None = None
    input_ids: list[int] | None = None
    max_tokens: int | None = None
    echo: bool = False
    skip_special_tokens: bool = True
    tools: list[dict] | None = None  # OpenAI tool definitions, rendered into the chat prompt
    tool_format: str = "hermes"  # how tools are described to a template that has no tool section
    # How `messages` are rendered (vLLM's and SGLang's fields): extra chat-template variables, and whether the
    # prompt opens the assistant's turn or continues the last message (then the assistant's).
    chat_template_kwargs: dict | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


@register
@dataclass
class AbortReq:
    """Stop `rid` (all samples, or only sample `index`) and free its KV. Unknown rids are ignored."""

    rid: str
    index: int | None = None


@register
@dataclass
class FlushCacheReq:
    """Drop every prefix-cache entry (POST /flush_cache); passed on unchanged by the tokenizer worker.
    The scheduler refuses while any request is queued or running, answering FlushCacheResult either way."""

    rid: str


@register
@dataclass
class TokenizeReq:
    """Tokenize `text` or chat `messages` (for POST /tokenize); answered by TokenizeResult or ReqError."""

    rid: str
    text: str | None = None
    messages: list[dict] | None = None
    add_special_tokens: bool = True
    chat_template_kwargs: dict | None = None  # as in GenerateReq
    add_generation_prompt: bool = True
    continue_final_message: bool = False


@register
@dataclass
class DetokenizeReq:
    rid: str
    tokens: list[int] = field(default_factory=list)


# ---- tokenizer worker -> scheduler --------------------------------------------------------------------
@register
@dataclass
class TokenizedGenerateReq:
    rid: str
    input_ids: list[int]
    params: SamplingParams


# ---- scheduler -> tokenizer worker -> API server -----------------------------------------------------
@register
@dataclass
class ModelInfo:
    """Sent once by the scheduler when the model is loaded; the ready handshake rides on it."""

    model_path: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]


@register
@dataclass
class TokenOutputBatch:
    outputs: list[TokenOutput]


@register
@dataclass
class StatsMsg:
    stats: SchedulerStats


@register
@dataclass
class ReqError:
    """A request failed before producing output (or was refused); `status` is the HTTP status to answer."""

    rid: str
    message: str
    status: int = 400
    param: str | None = None
    code: str | None = None


@register
@dataclass
class FlushCacheResult:
    """The scheduler's answer to FlushCacheReq: `ok` False (with the reason) when requests were running."""

    rid: str
    ok: bool
    message: str = ""


# ---- tokenizer worker -> API server ---------------------------------------------------------------------
@register
@dataclass
class TokenLogprob:
    """A token as text with its log-probability and the best alternatives (text, logprob). `logprob` is None only
    for a prompt's first token, which nothing before it predicts."""

    token: str
    token_id: int
    logprob: float | None
    top: list[tuple[str, float]] = field(default_factory=list)
    top_ids: list[int] = field(default_factory=list)  # the token ids of `top`, same order
    rank: int | None = None  # among the vocabulary, 1 the most likely (prompt tokens only)


@register
@dataclass
class StrOutput:
    """New text of one sample. `text` may be empty while bytes of a character (or a possible stop string) are
    held back. `completion_tokens` is the running total for the sample; `prompt_text` is set only on the
    first output when echo was asked for."""

    rid: str
    index: int
    text: str
    finished: bool = False
    finish_reason: str | None = None
    num_tokens: int = 0  # tokens this output covers
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_text: str | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # every prompt token, on the first output, when asked for


@register
@dataclass
class StrOutputBatch:
    outputs: list[StrOutput]


@register
@dataclass
class TokenizeResult:
    rid: str
    tokens: list[int]
    text: str
    max_model_len: int
