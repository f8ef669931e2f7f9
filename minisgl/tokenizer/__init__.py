"""Tokenizer loading and chat prompts; incremental detokenization (detokenize.py); the worker process (worker.py)."""

from __future__ import annotations

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


def encode_chat(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of a conversation rendered with the tokenizer's chat template, ready for the assistant's turn.

    Raises ValueError when the tokenizer has no template or the template rejects the conversation (e.g. roles
    that do not alternate). The template writes BOS itself where the model wants one, so none is added here.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises its own types, from inside the template
        raise ValueError(f"cannot apply the chat template: {e}") from e
    return tokenizer.encode(text, add_special_tokens=False)


__all__ = ["encode_chat", "load_tokenizer"]
