"""SGLang's native HTTP API: /generate, /health_generate, /get_model_info, /get_server_info, /flush_cache,
/abort_request, with SGLang's field names and response shapes, so SGLang clients and sglang-router work.

Validation and errors are the OpenAI endpoints' (same SamplingParams checks, same error body); unlike
those, an unknown field in the body or in `sampling_params` is a 400, never silently dropped: SGLang has many
sampling options we do not implement, and a client must learn that its option was not applied.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ConfigDict, Field, model_validator

from minisgl.message import FlushCacheReq, GenerateReq, StrOutput, TokenLogprob
from minisgl.sampling_params import SamplingParams
from minisgl.server import protocol as P
from minisgl.server.args import ServerArgs
from minisgl.server.engine_client import ClientGone, EngineClient
from minisgl.server.errors import APIError
from minisgl.server.openai_api import OpenAIServing
from minisgl.server.streaming import chain, sse

HEALTH_GENERATE_TIMEOUT_S = 20.0  # SGLang's default for /health_generate
VERSION = "minisgl-0.1.0"


class _Strict(P._Request):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class NativeSamplingParams(_Strict):
    """SGLang's `sampling_params` names; the attribute names OpenAIServing.sampling_params reads."""

    max_new_tokens: P.Int64 | None = 128  # SGLang's default; None: the rest of the context
    min_new_tokens: P.Int64 = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: P.Int64 = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[P.TokenId] | None = None
    ignore_eos: bool = False
    no_stop_trim: bool = False
    skip_special_tokens: bool = True
    n: P.Int64 = 1
    sampling_seed: P.Int64 | None = None
    seed: P.Int64 | None = None  # an alias of sampling_seed (OpenAI's name)
    logit_bias: dict[str, float] | None = None
    # SGLang's output constraints (at most one): a JSON schema (as text or an object), a regex, an EBNF grammar.
    json_schema: str | dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None

    @property
    def min_tokens(self) -> int:
        return self.min_new_tokens

    @model_validator(mode="after")
    def _one_seed(self) -> NativeSamplingParams:
        if self.seed is not None and self.sampling_seed is not None:
            raise ValueError("give sampling_seed or seed, not both")
        self.seed = self.seed if self.seed is not None else self.sampling_seed
        return self


class GenerateRequest(_Strict):
    """POST /generate. `text` / `input_ids` may be a list (a batch); `rid` then is a list of the same length."""

    text: str | list[str] | None = None
    input_ids: list[P.TokenId] | list[list[P.TokenId]] | None = None
    sampling_params: NativeSamplingParams = Field(default_factory=NativeSamplingParams)
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: P.Int64 = 0
    logprob_start_len: P.Int64 = -1  # -1: output tokens only; k >= 0: prompt tokens from position k on too
    return_text_in_logprobs: bool = False
    rid: str | list[str] | None = None
    # sglang-router re-serializes the body with these SGLang fields at their defaults: accepted when they ask
    # for nothing we do not do (the logging switches change nothing here).
    model: str | None = None
    log_metrics: bool = True
    no_logs: bool = False
    return_hidden_states: bool = False
    return_entropy: bool = False
    return_bytes: bool = False
    background: bool = False

    @model_validator(mode="after")
    def _unsupported(self) -> GenerateRequest:
        for name in ("return_hidden_states", "return_entropy", "return_bytes", "background"):
            if getattr(self, name):
                raise ValueError(f"{name}: true is not supported by this server")
        return self


class AbortRequest(_Strict):
    rid: str = ""
    abort_all: bool = False


class NativeServing:
    def __init__(self, client: EngineClient, openai: OpenAIServing, args: ServerArgs):
        self.client = client
        self.openai = openai
        self.args = args
        self.router = r = APIRouter()
        r.add_api_route("/generate", self.generate, methods=["POST"])
        r.add_api_route("/health_generate", self.health_generate, methods=["GET"])
        for path in ("/get_model_info", "/model_info"):
            r.add_api_route(path, self.model_info, methods=["GET"])
        for path in ("/get_server_info", "/server_info"):
            r.add_api_route(path, self.server_info, methods=["GET"])
        r.add_api_route("/flush_cache", self.flush_cache, methods=["GET", "POST"])
        r.add_api_route("/abort_request", self.abort_request, methods=["POST"])

    # ---- /generate ----------------------------------------------------------------------------------
    async def generate(self, req: GenerateRequest, request: Request) -> Any:
        start = time.monotonic()
        self.openai.check_model(req.model)
        prompts, batched = self._prompts(req)
        rids = self._rids(req.rid, len(prompts), batched)
        sp = req.sampling_params
        if sp.max_new_tokens is not None and sp.max_new_tokens < 1:
            raise APIError(400, f"max_new_tokens must be >= 1, got {sp.max_new_tokens}", "max_new_tokens")
        ctx = self.client.info.max_model_len
        if sp.max_new_tokens is not None and sp.max_new_tokens >= ctx:
            raise APIError(
                400,
                f"max_new_tokens must be < the context length {ctx}, got {sp.max_new_tokens}",
                "max_new_tokens",
                "context_length_exceeded",
            )
        if req.logprob_start_len < -1:
            raise APIError(400, "logprob_start_len must be -1 (output only) or >= 0", "logprob_start_len")
        if req.top_logprobs_num and not req.return_logprob:
            raise APIError(400, "top_logprobs_num requires return_logprob to be true", "top_logprobs_num")
        # logprob_start_len >= 0: the prompt's tokens from there on get logprobs too (computed over the whole prompt)
        prompt_lps = req.top_logprobs_num if req.return_logprob and req.logprob_start_len >= 0 else None
        params = self.openai.sampling_params(
            sp, sp.max_new_tokens, req.return_logprob, req.top_logprobs_num, None, prompt_lps
        )
        gens = []
        for rid, p in zip(rids, prompts):
            if isinstance(p, list):
                self.openai.check_ids(p, "input_ids")
            gens.append(
                GenerateReq(
                    rid,
                    dataclasses.replace(params),
                    text=p if isinstance(p, str) else None,
                    input_ids=p if isinstance(p, list) else None,
                    max_tokens=sp.max_new_tokens,
                    skip_special_tokens=sp.skip_special_tokens,
                )
            )
        try:
            job, events, first = await self.openai.start(request, gens, params.n)
        except ClientGone:
            return Response(status_code=499)
        acc = _Outputs(rids, params.n, req, start)
        if req.stream:
            return sse(self.client, job, self._stream(acc, first, events, batched or params.n > 1))
        try:
            async for o in chain(first, events):
                acc.add(o)
        except ClientGone:
            return Response(status_code=499)
        results = [acc.result(i) for i in range(len(rids) * params.n)]
        return results if batched or params.n > 1 else results[0]

    async def _stream(
        self, acc: _Outputs, first: StrOutput, events: AsyncIterator[StrOutput], indexed: bool
    ) -> AsyncIterator[str]:
        """SGLang's stream: each event carries the sample's text so far and its meta_info; `index` tells
        samples apart when there are several."""
        async for o in chain(first, events):
            i = acc.add(o)
            if o.text or o.finished or o.logprobs:
                out = acc.result(i)
                if indexed:
                    out["index"] = i
                yield f"data: {json.dumps(out, ensure_ascii=False)}\n\n"

    def _prompts(self, req: GenerateRequest) -> tuple[list[str | list[int]], bool]:
        if (req.text is None) == (req.input_ids is None):
            raise APIError(400, "give exactly one of text or input_ids", "text")
        if req.text is not None:
            if isinstance(req.text, str):
                return [req.text], False
            if not req.text:
                raise APIError(400, "text is an empty list", "text")
            return list(req.text), True
        ids = req.input_ids
        if not ids:
            raise APIError(400, "input_ids is empty", "input_ids")
        if isinstance(ids[0], int):
            return [list(ids)], False
        return [list(x) for x in ids], True

    def _rids(self, rid: str | list[str] | None, count: int, batched: bool) -> list[str]:
        if rid is None:
            rids = [uuid.uuid4().hex for _ in range(count)]
        elif isinstance(rid, str) and not batched:
            rids = [rid]
        elif isinstance(rid, list) and batched and len(rid) == count:
            rids = list(rid)
        else:
            raise APIError(400, f"rid must be a string for one prompt, a list of {count} strings for a batch", "rid")
        if any(not r for r in rids) or len(set(rids)) != len(rids):
            raise APIError(400, "rids must be non-empty and distinct", "rid")
        taken = next((r for r in rids if r in self.client.jobs), None)
        if taken is not None:
            raise APIError(400, f"a request with rid {taken!r} is already running", "rid")
        return rids

    # ---- health, info ----------------------------------------------------------------------------------
    async def health_generate(self, request: Request) -> Response:
        """Healthy when a one-token generation goes through the whole path within the timeout."""
        params = SamplingParams(temperature=0, max_tokens=1)
        gen = GenerateReq(self.client.new_rid(), params, input_ids=[0], max_tokens=1)
        job = self.client.submit([gen], 1)
        try:

            async def run() -> None:
                async for _ in self.client.events(job, request):
                    pass

            await asyncio.wait_for(run(), HEALTH_GENERATE_TIMEOUT_S)
        except (APIError, asyncio.TimeoutError) as e:
            raise APIError(503, f"the health check generation failed: {e or 'timed out'}") from None
        except ClientGone:
            return Response(status_code=499)
        finally:
            self.client.release(job)
        return Response(status_code=200)

    async def model_info(self) -> dict:
        info = self.client.info
        return {
            "model_path": info.model_path,
            "tokenizer_path": self.args.tokenizer or info.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "context_length": info.max_model_len,
            "served_model_name": self.openai.model_name,
        }

    async def server_info(self) -> dict:
        info = self.client.info
        settings = dataclasses.asdict(self.args)
        settings["api_key"] = "<set>" if self.args.api_key else None  # never echo a secret
        stats = self.client.metrics.stats
        return {
            **settings,
            "model_path": info.model_path,
            "tokenizer_path": self.args.tokenizer or info.model_path,
            "context_length": info.max_model_len,
            "vocab_size": info.vocab_size,
            "version": VERSION,
            "internal_states": [dataclasses.asdict(stats)],
        }

    # ---- cache, abort -------------------------------------------------------------------------------------
    async def flush_cache(self) -> Response:
        r = await self.client.call(FlushCacheReq(self.client.new_rid()))
        if not r.ok:
            raise APIError(400, r.message, code="requests_running")
        return Response(r.message, status_code=200)

    async def abort_request(self, req: AbortRequest) -> Response:
        """Ends the request `rid` (its response reports finish_reason "abort"); an unknown rid is no error,
        since the request may just have finished."""
        if not req.abort_all and not req.rid:
            raise APIError(400, "give rid, or abort_all: true", "rid")
        for rid in list(self.client.jobs) if req.abort_all else [req.rid]:
            self.client.abort(rid)
        return Response(status_code=200)


class _Outputs:
    """Per-sample accumulation of a /generate job, in SGLang's output order (prompt-major, then sample)."""

    def __init__(self, rids: list[str], n: int, req: GenerateRequest, start: float):
        self.slot = {rid: k for k, rid in enumerate(rids)}
        self.rids, self.n, self.req, self.start = rids, n, req, start
        num = len(rids) * n
        self.text = [""] * num
        self.prompt_tokens = [0] * num
        self.cached = [0] * num
        self.completion = [0] * num
        self.reason: list[str | None] = [None] * num
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(num)]
        self.prompt_logprobs: dict[int, list[TokenLogprob]] = {}  # per prompt (sample 0 brings them)

    def add(self, o: StrOutput) -> int:
        i = self.slot[o.rid] * self.n + o.index
        self.text[i] += o.text
        self.prompt_tokens[i] = max(self.prompt_tokens[i], o.prompt_tokens)
        self.cached[i] = max(self.cached[i], o.cached_tokens)
        self.completion[i] = max(self.completion[i], o.completion_tokens)
        self.logprobs[i] += o.logprobs or []
        if o.prompt_logprobs is not None:
            self.prompt_logprobs[self.slot[o.rid]] = o.prompt_logprobs
        if o.finished:
            self.reason[i] = o.finish_reason
        return i

    def result(self, i: int) -> dict:
        reason = self.reason[i]
        finish: dict | None = None
        if reason == "length":
            finish = {"type": "length", "length": self.completion[i]}
        elif reason == "abort":
            finish = {"type": "abort", "message": "the request was aborted"}
        elif reason is not None:
            finish = {"type": reason}
        meta: dict[str, Any] = {
            "id": self.rids[i // self.n],
            "finish_reason": finish,
            "prompt_tokens": self.prompt_tokens[i],
            "completion_tokens": self.completion[i],
            "cached_tokens": self.cached[i],
            "e2e_latency": time.monotonic() - self.start,
        }
        if self.req.return_logprob:
            text = self.req.return_text_in_logprobs
            start = self.req.logprob_start_len
            prompt = self.prompt_logprobs.get(i // self.n, [])[start:] if start >= 0 else []

            def tops(t: TokenLogprob) -> list | None:
                if t.logprob is None:  # the prompt's first token: nothing predicts it
                    return None
                return [[lp, tid, tok if text else None] for (tok, lp), tid in zip(t.top, t.top_ids)]

            meta["input_token_logprobs"] = [[t.logprob, t.token_id, t.token if text else None] for t in prompt]
            meta["output_token_logprobs"] = [
                [t.logprob, t.token_id, t.token if text else None] for t in self.logprobs[i]
            ]
            if self.req.top_logprobs_num:
                meta["input_top_logprobs"] = [tops(t) for t in prompt]
                meta["output_top_logprobs"] = [tops(t) for t in self.logprobs[i]]
        return {"text": self.text[i], "meta_info": meta}
