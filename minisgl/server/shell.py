"""`python -m minisgl --shell`: chat with the model in this terminal, the engine running in this process.

Each turn renders the whole conversation with the tokenizer's chat template, so the prefix cache serves the
earlier turns and only the new message is prefilled. The answer is printed as it is generated, delta by
delta (IncrementalDetokenizer keeps multi-byte characters whole). After the answer a statistics line is
printed: `[P prompt tokens, C generated, R tok/s]`.

Commands: /reset forgets the conversation, /exit (or Ctrl-D) leaves, /set KEY VALUE changes a sampling
parameter (temperature, top_p, top_k, min_p, repetition_penalty, max_tokens, seed). Ctrl-C while the
model answers stops that answer (it is not added to the conversation).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import sys
import time
from collections.abc import Callable

from minisgl.llm import LLM
from minisgl.sampling_params import SamplingParams
from minisgl.server.args import ServerArgs

HELP = "Commands: /reset (forget the conversation), /set KEY VALUE (sampling), /exit or Ctrl-D (leave)."
# llama.cpp's sampler defaults: greedy decoding sends a small model round one phrase until max_tokens
# (`/set temperature 0` for greedy, `/set seed N` for repeatable draws). 512 bounds a turn's wait.
DEFAULT_PARAMS = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, max_tokens=512)
SETTABLE = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repetition_penalty": float,
    "max_tokens": int,
    "seed": int,
}


@dataclasses.dataclass
class Turn:
    """The outcome of one answer: its text and token counts (`text` is what joins the conversation)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str | None


class ChatSession:
    """A conversation with an in-process `LLM`. Invariant: `messages` alternates user/assistant and ends with an
    assistant message between turns; `answer` leaves it unchanged when the answer is interrupted."""

    def __init__(self, llm: LLM, params: SamplingParams = DEFAULT_PARAMS):
        self.llm = llm
        self.params = params
        self.messages: list[dict] = []

    def reset(self) -> None:
        self.messages.clear()

    def set_param(self, key: str, value: str) -> None:
        """Raise ValueError for an unknown key or a value out of range (the old value stays)."""
        if key not in SETTABLE:
            raise ValueError(f"unknown parameter {key!r}; one of {', '.join(SETTABLE)}")
        params = dataclasses.replace(self.params, **{key: SETTABLE[key](value)})
        params.validate()
        self.params = params

    def answer(self, user: str, emit: Callable[[str], None]) -> Turn:
        """Generate the assistant's reply to `user`, passing text deltas to `emit` as they arrive."""
        from minisgl.tokenizer import encode_chat

        messages = self.messages + [{"role": "user", "content": user}]
        ids = encode_chat(self.llm.tokenizer, messages)
        context = self.llm.scheduler.max_model_len
        if len(ids) >= context:
            raise ValueError(f"the conversation has {len(ids)} tokens, the context length is {context}; /reset")
        # Without `/set seed`, a fresh draw each turn and each session, as llama-cli does (the engine's own
        # default would repeat the same answers in every session).
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        params = dataclasses.replace(self.params, max_tokens=min(self.params.max_tokens, context - len(ids)), seed=seed)
        parts: list[str] = []
        start, count, reason = time.perf_counter(), 0, None
        for delta, tokens, finish in self.llm.stream(ids, params):
            count, reason = count + tokens, finish
            if delta:
                parts.append(delta)
                emit(delta)
        text = "".join(parts)
        self.messages = messages + [{"role": "assistant", "content": text}]
        return Turn(text, len(ids), count, time.perf_counter() - start, reason)


def _emit(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _reader() -> Callable[[], str]:
    """prompt_toolkit's line editor (history, arrows) on a terminal; plain lines from a pipe."""
    if not sys.stdin.isatty():
        return lambda: input("> ")
    from prompt_toolkit import PromptSession

    session: PromptSession = PromptSession()
    return lambda: session.prompt("> ")


def run_shell(args: ServerArgs) -> int:
    """Load the model, then read and answer messages until /exit or Ctrl-D."""
    from minisgl.models.hub import resolve_model_path
    from minisgl.server.launch import setup_logging

    setup_logging(args.log_level)
    model_path = resolve_model_path(args.model)
    llm = LLM(**{**args.engine_kwargs(), "model": model_path})
    chat = ChatSession(llm)
    read = _reader()
    print(f"minisgl shell: chatting with {args.model_name(model_path)}. {HELP}", flush=True)
    try:
        while True:
            try:
                line = read().strip()
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            if line == "/exit":
                break
            if line == "/reset":
                chat.reset()
                print("(conversation cleared)", flush=True)
                continue
            if line.startswith("/set"):
                try:
                    _, key, value = line.split()
                    chat.set_param(key, value)
                    print(f"({key} = {value})", flush=True)
                except ValueError as e:
                    print(f"(usage: /set KEY VALUE: {e})", flush=True)
                continue
            if line.startswith("/") or not line:
                print(f"({HELP})" if line else "", flush=True)
                continue
            try:
                turn = chat.answer(line, _emit)
            except KeyboardInterrupt:
                print("\n(interrupted)", flush=True)
                continue
            except ValueError as e:
                print(f"({e})", flush=True)
                continue
            rate = turn.completion_tokens / max(turn.seconds, 1e-9)
            print(
                f"\n[{turn.prompt_tokens} prompt tokens, {turn.completion_tokens} generated, {rate:.1f} tok/s]",
                flush=True,
            )
    finally:
        llm.shutdown()
        logging.shutdown()
    return 0
