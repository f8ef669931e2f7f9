"""The tokenizer/detokenizer process: text in front of the scheduler, text behind it.

Requests from the API server are rendered (chat template), tokenized and checked against the model
(vocabulary, context length) here, so a bad prompt never reaches the scheduler and tokenization never slows
its loop. Token outputs from the scheduler are turned into text deltas per sample, stop strings are found
(the scheduler only knows token ids), and a sample that hit one is aborted in the scheduler at once so its
KV is freed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import zmq

from minisgl.message import (
    AbortReq,
    DetokenizeReq,
    FlushCacheReq,
    FlushCacheResult,
    GenerateReq,
    IpcPaths,
    ModelInfo,
    ReqError,
    StatsMsg,
    StrOutput,
    StrOutputBatch,
    TokenizedGenerateReq,
    TokenizeReq,
    TokenizeResult,
    TokenLogprob,
    TokenOutputBatch,
    inbox,
    outbox,
    recv,
    send,
)
from minisgl.scheduler.io import TokenOutput
from minisgl.tokenizer import max_token_chars, render_chat
from minisgl.tokenizer.detokenize import SampleText

logger = logging.getLogger(__name__)


class BadRequest(Exception):
    """A client error found while preparing a request; becomes an HTTP 400 naming `param`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


def _over_context(ctx: int, param: str, has: str) -> BadRequest:
    message = f"this model's maximum context length is {ctx} tokens, but the {param} has {has}"
    return BadRequest(message, param, "context_length_exceeded")


@dataclass
class _Sample:
    text: SampleText
    done: bool = False
    first: bool = True


@dataclass
class _Request:
    rid: str
    prompt_tokens: int
    prompt_text: str | None
    samples: list[_Sample] = field(default_factory=list)
    prompt_ids: list[int] | None = None  # kept only when prompt logprobs were asked for


class TokenizerWorker:
    """Message handlers of the tokenizer process; `handle` dispatches one message. Holds no sockets'
    ownership beyond sending, so it can be driven directly in tests."""

    def __init__(self, tokenizer: Any, to_scheduler: zmq.Socket, to_api: zmq.Socket):
        self.tokenizer = tokenizer
        self.to_scheduler = to_scheduler
        self.to_api = to_api
        self.info: ModelInfo | None = None
        self.reqs: dict[str, _Request] = {}
        self._piece = lru_cache(maxsize=1 << 16)(lambda tid: tokenizer.decode([tid]))
        self._max_token_chars = max_token_chars(tokenizer)

    def handle(self, msg: Any) -> None:
        if isinstance(msg, TokenOutputBatch):
            outs = [o for o in (self._on_output(t) for t in msg.outputs) if o is not None]
            if outs:
                send(self.to_api, StrOutputBatch(outs))
        elif isinstance(msg, GenerateReq):
            self._on_generate(msg)
        elif isinstance(msg, AbortReq):
            self.reqs.pop(msg.rid, None)
            send(self.to_scheduler, msg)
        elif isinstance(msg, ReqError):  # from the scheduler: the request never started
            self.reqs.pop(msg.rid, None)
            send(self.to_api, msg)
        elif isinstance(msg, FlushCacheReq):
            send(self.to_scheduler, msg)
        elif isinstance(msg, (StatsMsg, FlushCacheResult)):
            send(self.to_api, msg)
        elif isinstance(msg, ModelInfo):
            self.info = msg
            send(self.to_api, msg)
        elif isinstance(msg, (TokenizeReq, DetokenizeReq)):
            self._on_tokenize(msg)
        else:
            logger.error("unexpected message %r", type(msg).__name__)

    # ---- requests -------------------------------------------------------------------------------------
    def _render(
        self, text: str | None, messages: list[dict] | None, add_special_tokens: bool = True, **chat: Any
    ) -> list[int]:
        """Token ids of a text prompt, or of chat `messages` rendered by render_chat with the options `chat`.
        A text that must have more tokens than the context holds is refused before it is tokenized: tokenizing
        megabytes takes seconds, in which no other request's text is tokenized or detokenized."""
        if messages is not None:
            try:
                text, add_special_tokens = render_chat(self.tokenizer, messages, **chat), False
            except ValueError as e:
                raise BadRequest(str(e), "messages") from e
        text = text or ""
        at_least = len(text) // self._max_token_chars
        if self.info is not None and at_least >= self.info.max_model_len:
            param = "messages" if messages is not None else "prompt"
            has = f"at least {at_least} tokens ({len(text)} characters)"
            raise _over_context(self.info.max_model_len, param, has)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.info.vocab_size if self.info else len(self.tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param)

    def _prepare(self, req: GenerateReq) -> tuple[list[int], str | None]:
        param = "messages" if req.messages is not None else "prompt"
        if req.input_ids is not None:
            ids = list(req.input_ids)
            self._check_ids(ids, param)
        else:
            ids = self._render(
                req.text,
                req.messages,
                tools=req.tools,
                tool_format=req.tool_format,
                template_kwargs=req.chat_template_kwargs,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
            )
        if not ids:
            raise BadRequest(f"the {param} is empty", param)
        assert self.info is not None, "requests are accepted only after ModelInfo"
        ctx = self.info.max_model_len
        if len(ids) >= ctx:
            raise _over_context(ctx, param, f"{len(ids)} tokens")
        max_tokens = req.max_tokens if req.max_tokens is not None else ctx - len(ids)
        if len(ids) + max_tokens > ctx:
            raise BadRequest(
                f"this model's maximum context length is {ctx} tokens; you requested {len(ids) + max_tokens} "
                f"tokens ({len(ids)} in the {param}, {max_tokens} for the completion)",
                "max_tokens",
                "context_length_exceeded",
            )
        req.params.max_tokens = max_tokens
        if req.params.min_tokens > max_tokens:
            raise BadRequest(
                f"min_tokens ({req.params.min_tokens}) is more than the {max_tokens} tokens left in the context",
                "min_tokens",
            )
        prompt_text = None
        if req.echo:
            prompt_text = req.text if req.text is not None else self.tokenizer.decode(ids)
        return ids, prompt_text

    def _on_generate(self, req: GenerateReq) -> None:
        try:
            ids, prompt_text = self._prepare(req)
        except BadRequest as e:
            send(self.to_api, ReqError(req.rid, str(e), 400, e.param, e.code))
            return
        except Exception as e:  # a tokenizer failure on odd input must not take the process down
            logger.exception("tokenizing request %s failed", req.rid)
            send(self.to_api, ReqError(req.rid, f"cannot tokenize the prompt: {e}", 400))
            return
        p = req.params
        eos = self.info.eos_token_ids if self.info else []
        state = _Request(req.rid, len(ids), prompt_text, prompt_ids=ids if p.prompt_logprobs is not None else None)
        state.samples = [
            _Sample(SampleText.for_params(self.tokenizer, p, eos, req.skip_special_tokens)) for _ in range(p.n)
        ]
        self.reqs[req.rid] = state
        send(self.to_scheduler, TokenizedGenerateReq(req.rid, ids, p))

    def _on_tokenize(self, msg: TokenizeReq | DetokenizeReq) -> None:
        ctx = self.info.max_model_len if self.info else 0
        try:
            if isinstance(msg, TokenizeReq):
                ids = self._render(
                    msg.text,
                    msg.messages,
                    msg.add_special_tokens,
                    template_kwargs=msg.chat_template_kwargs,
                    add_generation_prompt=msg.add_generation_prompt,
                    continue_final_message=msg.continue_final_message,
                )
                result = TokenizeResult(msg.rid, ids, "", ctx)
            else:
                self._check_ids(msg.tokens, "tokens")
                result = TokenizeResult(msg.rid, list(msg.tokens), self.tokenizer.decode(msg.tokens), ctx)
        except BadRequest as e:
            send(self.to_api, ReqError(msg.rid, str(e), 400, e.param))
            return
        except Exception as e:
            send(self.to_api, ReqError(msg.rid, f"cannot process the request: {e}", 400))
            return
        send(self.to_api, result)

    # ---- outputs ----------------------------------------------------------------------------------------
    def _on_output(self, out: TokenOutput) -> StrOutput | None:
        req = self.reqs.get(out.rid)
        if req is None or req.samples[out.index].done:
            return None  # aborted by the client, or already ended by a stop string
        if out.error:
            self.reqs.pop(out.rid, None)
            code = "invalid_grammar" if out.error_status == 400 else "engine_error"
            send(self.to_api, ReqError(out.rid, out.error, out.error_status, code=code))
            return None
        s = req.samples[out.index]
        text, hit_stop = s.text.feed(out.token_ids, out.finished, out.finish_reason)
        finished = out.finished or hit_stop
        if hit_stop and not out.finished:
            send(self.to_scheduler, AbortReq(out.rid, out.index))  # free its KV now, not at max_tokens
        logprobs = self._logprobs(out.token_ids, out.logprobs, out.top_logprobs) if out.logprobs is not None else None
        prompt_lps = None
        if out.prompt_logprobs is not None and req.prompt_ids:
            first = TokenLogprob(self._piece(req.prompt_ids[0]), req.prompt_ids[0], None)
            rest = self._logprobs(req.prompt_ids[1:], out.prompt_logprobs, out.prompt_top_logprobs, out.prompt_ranks)
            prompt_lps = [first, *rest]
        if not (text or finished or logprobs or prompt_lps or (s.first and req.prompt_text is not None)):
            return None
        result = StrOutput(
            out.rid,
            out.index,
            text,
            finished,
            "stop" if hit_stop else out.finish_reason,
            len(out.token_ids),
            req.prompt_tokens,
            s.text.tokens,
            out.cached_tokens,
            logprobs,
            req.prompt_text if s.first else None,
            prompt_lps,
        )
        s.first = False
        if finished:
            s.done = True
            if all(x.done for x in req.samples):
                del self.reqs[out.rid]
        return result

    def _logprobs(
        self,
        ids: list[int],
        lps: list[float] | None,
        tops: list[list[tuple[int, float]]] | None,
        ranks: list[int] | None = None,
    ) -> list[TokenLogprob]:
        tops = tops or [[] for _ in ids]
        ranks = ranks or [None] * len(ids)
        return [
            TokenLogprob(
                self._piece(tid), tid, lp, [(self._piece(a), alp) for a, alp in top], [a for a, _ in top], rank
            )
            for tid, lp, top, rank in zip(ids, lps or [], tops, ranks)
        ]


def tokenizer_main(
    ready: Any, model_path: str, tokenizer_path: str | None, paths: IpcPaths, trust_remote_code: bool = False
) -> None:
    """Process entry point: load the tokenizer, then serve messages until killed."""
    from minisgl.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_path, tokenizer_path, trust_remote_code)
    ctx = zmq.Context()
    sock = inbox(ctx, paths.tokenizer)
    worker = TokenizerWorker(tokenizer, outbox(ctx, paths.scheduler), outbox(ctx, paths.api))
    ready.send("tokenizer")
    while True:
        worker.handle(recv(sock))
