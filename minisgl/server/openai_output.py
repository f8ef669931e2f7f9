"""The parts of OpenAI responses counted or formatted from the engine's outputs: token usage (whole, or on
every stream chunk) and logprobs in the chat and completions shapes."""

from __future__ import annotations

from typing import NamedTuple

from minisgl.message import StrOutput, TokenLogprob
from minisgl.server import protocol as P


class Usage:
    """Token counts of a job: the prompt once per rid, completion tokens of every sample."""

    def __init__(self) -> None:
        self.prompt: dict[str, int] = {}
        self.cached: dict[str, int] = {}
        self.completion: dict[tuple[str, int], int] = {}

    def add(self, o: StrOutput) -> None:
        self.prompt[o.rid] = o.prompt_tokens
        self.cached[o.rid] = o.cached_tokens
        self.completion[(o.rid, o.index)] = max(o.completion_tokens, self.completion.get((o.rid, o.index), 0))

    def usage(self) -> P.Usage:
        prompt, completion = sum(self.prompt.values()), sum(self.completion.values())
        return P.Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=P.PromptTokensDetails(cached_tokens=sum(self.cached.values())),
        )


class StreamUsage(NamedTuple):
    """stream_options: a last chunk with the usage (`include`), the usage so far on every chunk (`continuous`)."""

    include: bool = False
    continuous: bool = False

    @classmethod
    def of(cls, options: P.StreamOptions | None) -> StreamUsage:
        return cls(options.include_usage, options.continuous_usage_stats) if options else cls()

    def on_chunk(self, acc: Usage, final: bool) -> P.Usage | None:
        return acc.usage() if final or self.continuous else None


def _bytes(s: str) -> list[int]:
    return list(s.encode("utf-8", errors="replace"))


def chat_logprobs(lps: list[TokenLogprob] | None) -> list[P.ChatTokenLogprob]:
    return [
        P.ChatTokenLogprob(
            token=t.token,
            logprob=t.logprob,
            bytes=_bytes(t.token),
            top_logprobs=[P.TopLogprob(token=a, logprob=b, bytes=_bytes(a)) for a, b in t.top],
        )
        for t in lps or []
    ]


def extend_completion_logprobs(out: P.CompletionLogprobs | None, lps: list[TokenLogprob] | None, offset: int) -> None:
    if out is None:
        return
    for t in lps or []:
        out.tokens.append(t.token)
        out.token_logprobs.append(t.logprob)
        out.top_logprobs.append({a: b for a, b in t.top} if t.logprob is not None else None)
        out.text_offset.append(offset)
        offset += len(t.token)


def vllm_prompt_logprobs(lps: list[TokenLogprob] | None) -> P.PromptLogprobs | None:
    """vLLM's prompt_logprobs from the prompt's TokenLogprobs (the first token has none)."""
    if lps is None:
        return None
    out: P.PromptLogprobs = []
    for t in lps:
        if t.logprob is None:
            out.append(None)
            continue
        entry = {str(tid): {"logprob": lp, "rank": k + 1, "decoded_token": tok}
                 for k, ((tok, lp), tid) in enumerate(zip(t.top, t.top_ids))}  # fmt: skip
        entry[str(t.token_id)] = {"logprob": t.logprob, "rank": t.rank, "decoded_token": t.token}
        out.append(entry)
    return out
