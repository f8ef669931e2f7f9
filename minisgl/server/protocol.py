"""Pydantic models of the OpenAI-compatible API: requests as clients send them, responses field by field.

A request body with a field it does not declare is a 400 (OpenAI's own answer: "unrecognized request
argument supplied"), so an option from another server (vLLM's `use_beam_search`, ...) is never silently dropped.
Declared are OpenAI's fields, the vLLM/SGLang extensions this server honours, bookkeeping fields that change
nothing in the answer (`store`, `metadata`, ...), and OpenAI fields that would change it and are not
supported, so that the handlers can refuse them by name. Objects inside a body (messages, tools) ignore
unknown fields: clients send back the assistant messages they received, with `refusal`, `annotations` and
the like. Requests reject non-finite floats and integers outside int64, so nothing a client sends can
overflow the msgpack wire format downstream. Ranges that depend on meaning (temperature >= 0, ...) are
checked by SamplingParams.validate, in one place.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
TokenId = Annotated[int, Field(ge=0, le=2**63 - 1)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class _Body(_Request):
    """A request body, or an option object whose every field matters: unknown fields are a 400."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage so far on every chunk


class StructuredOutputs(_Body):
    """vLLM's structured_outputs object: one of these constrains the output."""

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _SamplingRequest(_Body):
    """Fields shared by chat and text completions (OpenAI's, plus the common vLLM/SGLang extensions)."""

    model: str | None = None
    n: Int64 = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Int64 = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, as JSON keys are) -> bias
    min_tokens: Int64 = 0  # vLLM's and SGLang's: no EOS, stop token or stop string before this many tokens
    prompt_logprobs: Int64 | None = None  # vLLM's: each prompt token's logprob, with this many alternatives
    no_stop_trim: bool = False  # SGLang's: keep the stop string or token that ended the output
    include_stop_str_in_output: bool = False  # vLLM's name for no_stop_trim
    # SGLang's structured-output extensions (at most one; chat also takes OpenAI's response_format), and vLLM's
    json_schema: str | dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None
    # Bookkeeping, accepted and ignored: none of them changes the answer.
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # sglang-router adds this at SGLang's default when it forwards a request; true is refused by the handlers.
    return_hidden_states: bool = False


class JsonSchemaFormat(_Request):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's response_format: type text, json_object or json_schema (checked by the handler, so an unknown
    type is answered with a 400 naming it)."""

    type: str
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: str = "function"
    function: FunctionDef


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: str = "function"
    function: NamedFunction


class FunctionCallIn(_Request):
    name: str
    arguments: str | dict[str, Any] | None = None


class ToolCallIn(_Request):
    id: str | None = None
    type: str = "function"
    function: FunctionCallIn


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: Int64 | None = None
    max_completion_tokens: Int64 | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: Int64 | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # vLLM's and SGLang's chat template options: extra variables for the template, and how the prompt ends
    # (a new assistant turn, or continuing the last message, which must then be the assistant's)
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # SGLang's reasoning-parser switches (sglang-router sends them): this server has no reasoning parser, so,
    # as in SGLang without --reasoning-parser, they change nothing.
    separate_reasoning: bool = True
    stream_reasoning: bool = True
    # Read only to be refused (OpenAI fields that would change the answer and that this server does not do)
    functions: Any = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: Int64 | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: Int64 | None = None  # number of alternatives per token, completions style
    # Read only to be refused unless they ask for nothing beyond n samples / no insertion
    best_of: Int64 | None = None
    suffix: str | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    # with messages, as on chat completions (vLLM's /tokenize takes them too)
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[TokenId]


# ---- responses ----------------------------------------------------------------------------------------
# vLLM's prompt_logprobs: per prompt token (None for the first) a map from token id to its logprob, its rank in
# the vocabulary and its text, for the token itself and the top alternatives.
PromptLogprobs = list[dict[str, dict[str, Any]] | None]


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "minisgl"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
