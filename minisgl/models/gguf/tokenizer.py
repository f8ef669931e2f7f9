"""The tokenizer a GGUF file embeds.

transformers builds it from the file's metadata (AutoTokenizer with `gguf_file`), which takes seconds and
imports torch: a quarter of a GB in the tokenizer process, which needs neither. So the first load of a file
converts it in a child process and saves the result as an ordinary tokenizer folder in the cache
(core/settings.py: MINISGL_CACHE_DIR), keyed by the file's path, size and mtime and transformers' version;
every load then reads that folder with PreTrainedTokenizerFast, the class transformers gives a GGUF's tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from minisgl.core import settings


def load_gguf_tokenizer(path: str) -> Any:
    """The transformers tokenizer embedded in a GGUF file, with the file's chat template attached."""
    from transformers import PreTrainedTokenizerFast

    folder = _cached_folder(os.path.abspath(path))
    if folder is None:  # no writable cache: convert here
        return _convert(path)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def _cached_folder(path: str) -> str | None:
    import transformers

    st = os.stat(path)
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}".encode()).hexdigest()
    folder = os.path.join(settings.cache_dir(), "tokenizers", key[:24])
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return folder
    try:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        staging = tempfile.mkdtemp(dir=os.path.dirname(folder))
    except OSError:
        return None
    try:
        code = f"from {__name__} import _convert; import sys; _convert(sys.argv[1]).save_pretrained(sys.argv[2])"
        subprocess.run([sys.executable, "-c", code, path, staging], check=True, stdout=subprocess.DEVNULL)
        try:
            os.rename(staging, folder)  # atomic; another process may have got there first, with the same files
        except OSError:
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder if os.path.isfile(os.path.join(folder, "tokenizer.json")) else None


def _convert(path: str) -> Any:
    from transformers import AutoTokenizer

    from minisgl.models.gguf.reader import read_gguf_header

    path = os.path.abspath(path)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    if not getattr(tok, "chat_template", None):
        template = read_gguf_header(path).metadata.get("tokenizer.chat_template")
        if template:
            tok.chat_template = template
    return tok
