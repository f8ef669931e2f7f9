"""The tokenizer a GGUF file embeds."""

from __future__ import annotations

import os
from typing import Any

from minisgl.models.gguf.reader import read_gguf_header


def load_gguf_tokenizer(path: str) -> Any:
    """The transformers tokenizer embedded in a GGUF file, with the file's chat template attached."""
    from transformers import AutoTokenizer

    path = os.path.abspath(path)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    if not getattr(tok, "chat_template", None):
        template = read_gguf_header(path).metadata.get("tokenizer.chat_template")
        if template:
            tok.chat_template = template
    return tok
