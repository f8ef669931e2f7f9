"""Tokenizer loading, incremental detokenization and the tokenizer/detokenizer worker process."""

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


__all__ = ["load_tokenizer"]
