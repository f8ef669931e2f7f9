"""Turn what the user passed as `--model` into a local path."""

from __future__ import annotations

import os


def resolve_model_path(model: str | None) -> str:
    """A local directory or .gguf file is used as is; None means the embedded default model; anything else
    is a Hugging Face repo id fetched with huggingface_hub (which honours HF_HOME and HF_HUB_OFFLINE)."""
    if model is None:
        from minisgl.models.default_model import default_model_path

        return default_model_path()
    if os.path.exists(model):
        return model
    if model.count("/") > 1 or model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {model!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # offline, unknown repo, no access: say what was tried
        raise FileNotFoundError(
            f"{model!r} is neither a local path nor a downloadable Hugging Face repo id ({type(e).__name__}: {e})"
        ) from e
