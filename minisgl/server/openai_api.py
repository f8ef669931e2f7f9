"""POST /v1/chat/completions and /v1/completions: OpenAI requests in, OpenAI responses or SSE streams out.

A request is checked here as far as the API server can (schema, model name, ranges, token ids), then
submitted; the first reply is awaited before answering, so an error found downstream (prompt too long,
queue full) is still a proper HTTP error status even for a stream. After that, a stream reports an error
as one `data: {"error": ...}` event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from minisgl.message import GenerateReq, StrOutput
from minisgl.sampling_params import SamplingParams
from minisgl.server import openai_output as out
from minisgl.server import protocol as P
from minisgl.server import structured
from minisgl.server.chat_messages import flatten_message
from minisgl.server.engine_client import ClientGone, EngineClient, Job
from minisgl.server.errors import APIError, safe_text
from minisgl.server.streaming import chain, sse

MAX_N = 128  # samples per request: more would let one request flood the queue
_SEED_MOD = 2**63  # the engine takes non-negative seeds; OpenAI allows any int64


class OpenAIServing:
    def __init__(self, client: EngineClient, model_name: str, tool_call_parser: str = "hermes"):
        self.client = client
        self.model_name = model_name
        self.tool_call_parser = tool_call_parser
        self.router = APIRouter()
        self.router.add_api_route("/v1/chat/completions", self.chat, methods=["POST"])
        self.router.add_api_route("/v1/completions", self.completions, methods=["POST"])

    # ---- shared checks ------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise APIError(
                404,
                f"the model `{safe_text(model)}` does not exist; this server serves `{self.model_name}`",
                "model",
                "model_not_found",
            )

    def check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.client.info.vocab_size
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param)

    def sampling_params(
        self,
        req: P._SamplingRequest,
        max_tokens: int | None,
        logprobs: bool,
        top_logprobs: int,
        plan: structured.ToolPlan | None = None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        p = SamplingParams(
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            frequency_penalty=req.frequency_penalty,
            presence_penalty=req.presence_penalty,
            seed=None if req.seed is None else req.seed % _SEED_MOD,
            # None: the worker fills in the rest of the context (and checks min_tokens against it)
            max_tokens=max(1, req.min_tokens) if max_tokens is None else max_tokens,
            min_tokens=req.min_tokens,
            stop=stop,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            no_stop_trim=req.no_stop_trim or getattr(req, "include_stop_str_in_output", False),
            n=req.n,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=_logit_bias(req.logit_bias),
            **structured.constraint(req, plan),
        )
        try:
            p.validate()
        except ValueError as e:
            raise APIError(400, str(e), str(e).split()[0]) from None
        if p.n > MAX_N:
            raise APIError(400, f"n must be <= {MAX_N}, got {p.n}", "n")
        if max_tokens is not None and max_tokens >= self.client.info.max_model_len:
            raise APIError(
                400,
                f"max_tokens must be < the context length {self.client.info.max_model_len}, got {max_tokens}",
                "max_tokens",
                "context_length_exceeded",
            )
        self.check_ids(p.stop_token_ids, "stop_token_ids")
        self.check_ids(list(p.logit_bias), "logit_bias")
        return p

    async def start(
        self, request: Request, reqs: list[GenerateReq], n: int
    ) -> tuple[Job, AsyncIterator[StrOutput], StrOutput]:
        """Submit, then wait for the first output (errors raise here, before any response is sent)."""
        job = self.client.submit(reqs, n)
        events = self.client.events(job, request)
        try:
            first = await events.__anext__()
        except BaseException:
            await events.aclose()
            raise
        return job, events, first

    def check_extensions(self, req: P._SamplingRequest) -> None:
        """The OpenAI endpoints' own refusals of vLLM/SGLang fields (the native API has its own fields)."""
        if req.prompt_logprobs is not None and req.stream:
            raise APIError(400, "prompt_logprobs is not available with stream", "prompt_logprobs")
        if req.return_hidden_states:
            raise APIError(400, "return_hidden_states is not supported by this server", "return_hidden_states")

    # ---- chat ---------------------------------------------------------------------------------------------
    async def chat(self, req: P.ChatCompletionRequest, request: Request) -> Any:
        self.check_model(req.model)
        if not req.messages:
            raise APIError(400, "messages must contain at least one message", "messages")
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
        if req.functions is not None or req.function_call is not None:
            param = "functions" if req.functions is not None else "function_call"
            raise APIError(400, f"{param} is not supported (OpenAI deprecated it): use tools and tool_choice", param)
        if req.modalities is not None and set(req.modalities) - {"text"}:
            raise APIError(400, "only the text modality is supported", "modalities")
        if req.audio is not None:
            raise APIError(400, "audio output is not supported", "audio")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        self.check_extensions(req)
        plan = structured.tool_plan(req, self.tool_call_parser)
        params = self.sampling_params(req, max_tokens, req.logprobs, req.top_logprobs or 0, plan, req.prompt_logprobs)
        messages = [flatten_message(m, i) for i, m in enumerate(req.messages)]
        gen = GenerateReq(
            self.client.new_rid(),
            params,
            messages=messages,
            max_tokens=max_tokens,
            skip_special_tokens=req.skip_special_tokens,
            tools=plan.tools if plan else None,
            tool_format=self.tool_call_parser,
            chat_template_kwargs=req.chat_template_kwargs,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
        )
        try:
            job, events, first = await self.start(request, [gen], params.n)
        except ClientGone:
            return Response(status_code=499)
        rid, created = P.new_id("chatcmpl-"), P.now()
        if req.stream:
            usage = out.StreamUsage.of(req.stream_options)
            return sse(self.client, job, self._chat_stream(rid, created, params.n, first, events, usage, plan))
        texts: list[list[str]] = [[] for _ in range(params.n)]
        lps: list[list[P.ChatTokenLogprob]] = [[] for _ in range(params.n)]
        reasons: list[str | None] = [None] * params.n
        acc = out.Usage()
        prompt_lps = None
        try:
            async for o in chain(first, events):
                prompt_lps = o.prompt_logprobs or prompt_lps
                texts[o.index].append(o.text)
                lps[o.index] += out.chat_logprobs(o.logprobs)
                reasons[o.index] = o.finish_reason if o.finished else reasons[o.index]
                acc.add(o)
        except ClientGone:
            return Response(status_code=499)
        choices = []
        for i in range(params.n):
            content, calls = structured.tool_calls(plan, "".join(texts[i]))
            reason = "tool_calls" if calls and reasons[i] == "stop" else reasons[i]
            msg = P.ChatResponseMessage(content=content, tool_calls=calls or None)
            choices.append(
                P.ChatChoice(
                    index=i,
                    message=msg,
                    logprobs=P.ChatLogprobs(content=lps[i]) if req.logprobs else None,
                    finish_reason=reason,
                )
            )
        return P.ChatCompletionResponse(
            id=rid,
            created=created,
            model=self.model_name,
            choices=choices,
            usage=acc.usage(),
            prompt_logprobs=out.vllm_prompt_logprobs(prompt_lps) if req.prompt_logprobs is not None else None,
        )

    async def _chat_stream(
        self,
        rid: str,
        created: int,
        n: int,
        first: StrOutput,
        events: AsyncIterator[StrOutput],
        usage: out.StreamUsage,
        plan: structured.ToolPlan | None = None,
    ) -> AsyncIterator[str]:
        acc = out.Usage()

        def chunk(choices: list[P.ChatChunkChoice], final: bool = False) -> str:
            c = P.ChatCompletionChunk(
                id=rid, created=created, model=self.model_name, choices=choices, usage=usage.on_chunk(acc, final)
            )
            return f"data: {c.model_dump_json()}\n\n"

        for i in range(n):  # OpenAI opens every choice with the role
            yield chunk([P.ChatChunkChoice(index=i, delta=P.ChatDelta(role="assistant", content=""))])
        tools = [plan.stream() for _ in range(n)] if plan is not None else None
        called = [False] * n
        async for o in chain(first, events):
            acc.add(o)
            lp = P.ChatLogprobs(content=out.chat_logprobs(o.logprobs)) if o.logprobs is not None else None
            text, calls = o.text, None
            if tools is not None:
                d = tools[o.index].feed(o.text, final=o.finished)
                text = d.content
                calls = [
                    P.DeltaToolCall(
                        index=i,
                        id=cid,
                        type="function" if cid else None,
                        function=P.DeltaFunctionCall(name=name, arguments=args),
                    )
                    for i, cid, name, args in d.calls
                    if plan.parallel or i == 0
                ] or None
                called[o.index] = called[o.index] or bool(calls)
            reason = o.finish_reason if o.finished else None
            if reason == "stop" and called[o.index]:
                reason = "tool_calls"
            if text or o.finished or lp or calls:
                yield chunk(
                    [
                        P.ChatChunkChoice(
                            index=o.index,
                            delta=P.ChatDelta(content=text or None, tool_calls=calls),
                            logprobs=lp,
                            finish_reason=reason,
                        )
                    ]
                )
        if usage.include:
            yield chunk([], final=True)

    # ---- completions --------------------------------------------------------------------------------------
    async def completions(self, req: P.CompletionRequest, request: Request) -> Any:
        self.check_model(req.model)
        echo_lps = req.logprobs if req.echo else None  # the prompt's tokens get logprobs too
        if echo_lps is not None and req.n != 1:
            raise APIError(400, "echo with logprobs needs n = 1", "n")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported (the n samples are returned as they are)", "best_of")
        if req.suffix:
            raise APIError(400, "suffix (text insertion) is not supported", "suffix")
        self.check_extensions(req)
        want_lp = req.logprobs is not None
        params = self.sampling_params(
            req, req.max_tokens, want_lp, req.logprobs or 0, None, _most(echo_lps, req.prompt_logprobs)
        )
        prompts = _prompts(req.prompt)
        gens = []
        for p in prompts:
            if isinstance(p, list):
                self.check_ids(p, "prompt")
            gens.append(
                GenerateReq(
                    self.client.new_rid(),
                    params,
                    text=p if isinstance(p, str) else None,
                    input_ids=p if isinstance(p, list) else None,
                    max_tokens=req.max_tokens,
                    echo=req.echo,
                    skip_special_tokens=req.skip_special_tokens,
                )
            )
        try:
            job, events, first = await self.start(request, gens, params.n)
        except ClientGone:
            return Response(status_code=499)
        slot = {g.rid: k for k, g in enumerate(gens)}
        rid, created = P.new_id("cmpl-"), P.now()
        num = len(gens) * params.n
        if req.stream:
            usage = out.StreamUsage.of(req.stream_options)
            return sse(
                self.client, job, self._completion_stream(rid, created, slot, params.n, first, events, usage, want_lp)
            )
        texts: list[list[str]] = [[] for _ in range(num)]
        lps = [P.CompletionLogprobs() if want_lp else None for _ in range(num)]
        reasons: list[str | None] = [None] * num
        prompt_lps: dict[int, list] = {}  # per prompt: sample 0 brings them
        acc = out.Usage()
        try:
            async for o in chain(first, events):
                i = slot[o.rid] * params.n + o.index
                if o.prompt_logprobs is not None:
                    prompt_lps[slot[o.rid]] = o.prompt_logprobs
                texts[i].append((o.prompt_text or "") + o.text)
                end = sum(map(len, texts[i]))
                out.extend_completion_logprobs(lps[i], o.prompt_logprobs if req.echo else None, end - len(texts[i][-1]))
                out.extend_completion_logprobs(lps[i], o.logprobs, end - len(o.text))
                reasons[i] = o.finish_reason if o.finished else reasons[i]
                acc.add(o)
        except ClientGone:
            return Response(status_code=499)
        vllm_lps = req.prompt_logprobs is not None
        choices = [
            P.CompletionChoice(
                index=i,
                text="".join(texts[i]),
                logprobs=lps[i],
                finish_reason=reasons[i],
                prompt_logprobs=out.vllm_prompt_logprobs(prompt_lps.get(i // params.n)) if vllm_lps else None,
            )
            for i in range(num)
        ]
        return P.CompletionResponse(id=rid, created=created, model=self.model_name, choices=choices, usage=acc.usage())

    async def _completion_stream(
        self,
        rid: str,
        created: int,
        slot: dict[str, int],
        n: int,
        first: StrOutput,
        events: AsyncIterator[StrOutput],
        usage: out.StreamUsage,
        want_lp: bool,
    ) -> AsyncIterator[str]:
        acc = out.Usage()

        def chunk(choices: list[P.CompletionChoice], final: bool = False) -> str:
            c = P.CompletionResponse(
                id=rid, created=created, model=self.model_name, choices=choices, usage=usage.on_chunk(acc, final)
            )
            return f"data: {c.model_dump_json()}\n\n"

        offsets: dict[int, int] = {}
        async for o in chain(first, events):
            acc.add(o)
            i = slot[o.rid] * n + o.index
            text = (o.prompt_text or "") + o.text
            lp = P.CompletionLogprobs() if want_lp else None
            # a stream gets prompt logprobs only with echo (prompt_logprobs is refused there)
            out.extend_completion_logprobs(lp, o.prompt_logprobs, offsets.get(i, 0))
            out.extend_completion_logprobs(lp, o.logprobs, offsets.get(i, 0) + len(o.prompt_text or ""))
            offsets[i] = offsets.get(i, 0) + len(text)
            if text or o.finished or (lp and lp.tokens):
                yield chunk(
                    [
                        P.CompletionChoice(
                            index=i, text=text, logprobs=lp, finish_reason=o.finish_reason if o.finished else None
                        )
                    ]
                )
        if usage.include:
            yield chunk([], final=True)


# ---- helpers ----------------------------------------------------------------------------------------------
def _most(a: int | None, b: int | None) -> int | None:
    """The larger of two optional counts (None: not asked)."""
    return b if a is None else a if b is None else max(a, b)


def _prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "the prompt is empty", "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return [p if isinstance(p, str) else list(p) for p in prompt]


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias (JSON keys are strings) with token-id keys."""
    out = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = value
        except ValueError:
            raise APIError(400, f"logit_bias keys must be token ids, got {safe_text(key)!r}", "logit_bias") from None
    return out
