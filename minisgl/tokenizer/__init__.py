"""Tokenizer loading and chat prompts; incremental detokenization (detokenize.py); the worker process (worker.py)."""

from __future__ import annotations

import json
import os
from typing import Any


def load_tokenizer(model_path: str, tokenizer_path: str | None = None, trust_remote_code: bool = False) -> Any:
    """The Hugging Face tokenizer for a model: from `tokenizer_path` if given, else from `model_path`.

    A .gguf file carries its own tokenizer (read by minisgl.models.gguf); anything else is a directory or
    repo id for `AutoTokenizer.from_pretrained`. Both paths give a transformers tokenizer, so callers can
    rely on `encode`, `decode` and `apply_chat_template`.
    """
    path = tokenizer_path or model_path
    if path.endswith(".gguf") or os.path.isfile(path):
        from minisgl.models.gguf import is_gguf, load_gguf_tokenizer

        if is_gguf(path):
            return load_gguf_tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


# Arguments of apply_chat_template that encode_chat sets itself: template variables may not override them.
_RESERVED = frozenset({"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                       "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                       "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})  # fmt: skip


def encode_chat(tokenizer: Any, messages: list[dict], **options: Any) -> list[int]:
    """Token ids of `render_chat(tokenizer, messages, **options)`."""
    return tokenizer.encode(render_chat(tokenizer, messages, **options), add_special_tokens=False)


def render_chat(
    tokenizer: Any,
    messages: list[dict],
    tools: list[dict] | None = None,
    tool_format: str = "hermes",
    template_kwargs: dict | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> str:
    """A conversation rendered with the tokenizer's chat template, ready for the assistant's turn
    (`add_generation_prompt`), or ending inside the last message, an assistant's, for the model to continue
    (`continue_final_message`; then without the generation prompt).

    Raises ValueError when the tokenizer has no template or the template rejects the conversation (e.g. roles
    that do not alternate). The template writes BOS itself where the model wants one, so none is added here.
    `tools` (OpenAI tool definitions), assistant `tool_calls` and `tool` messages go to a template that knows
    them; for one that does not, they are written into the messages in `tool_format` (see tool_calls.py).
    `template_kwargs` are more variables for the template (e.g. Qwen3's `enable_thinking`).
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("this model's tokenizer has no chat template")
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
    if continue_final_message and (not messages or messages[-1].get("role") != "assistant"):
        raise ValueError("continue_final_message needs the last message to be the assistant's")
    clash = sorted(_RESERVED & set(template_kwargs or {}))
    if clash:
        raise ValueError(f"chat_template_kwargs may not set {clash[0]}")
    kwargs: dict = dict(template_kwargs or {})
    uses_tools = bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if uses_tools and isinstance(template, str) and "tools" in template:
        kwargs["tools"] = tools or None
        messages = [_with_object_arguments(m) for m in messages]
    elif uses_tools:
        from minisgl.tokenizer.tool_calls import get_format, inject_tools

        messages = inject_tools(messages, tools, get_format(tool_format))
    try:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **kwargs,
        )
    except Exception as e:  # jinja raises its own types, from inside the template
        raise ValueError(f"cannot apply the chat template: {e}") from e


def max_token_chars(tokenizer: Any) -> int:
    """The most characters of text one token can stand for, times a margin: a text of n characters has at least
    n / max_token_chars tokens, so a prompt far beyond the context is refused without tokenizing it.

    A vocabulary entry spells one character per character (SentencePiece's "▁" for a space) or byte (byte-level
    BPE, byte-fallback "<0x0A>") of the text it stands for, so its length bounds that text's. The margin (4) covers
    normalizers that compose characters (NFC/NFKC: at most 3 into 1). Not a bound for tokenizers that map a run of
    unknown characters to one token (WordPiece's [UNK], fused <unk>), which no supported model uses."""
    return 4 * max((len(t) for t in tokenizer.get_vocab()), default=1)


def _with_object_arguments(m: dict) -> dict:
    """Templates with tool support expect each call's arguments as a mapping (OpenAI sends a JSON string)."""
    calls = m.get("tool_calls")
    if not calls:
        return m
    out = []
    for c in calls:
        fn = dict(c.get("function", {}))
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except ValueError:
                pass
        out.append({**c, "function": fn})
    return {**m, "tool_calls": out}


__all__ = ["encode_chat", "load_tokenizer", "max_token_chars", "render_chat"]
