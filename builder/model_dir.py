"""Where a model is: a local folder, or a Hugging Face hub snapshot. Light (no torch): the pipeline
file's inputs are checked with it before any model work."""
from __future__ import annotations

import os

from builder.errors import KnnlmError


class ModelError(KnnlmError, ValueError):
    """A model that cannot be used. `why`, when set, is the message without the `--model PATH: ` it
    starts with, for callers that name the model otherwise (a pipeline key)."""

    def __init__(self, message: str, why: str | None = None):
        super().__init__(message)
        self.why = why

    def __reduce__(self):
        return type(self), (str(self), self.why)


def _model_dir_error(model: str, why: str) -> ModelError:
    return ModelError(f"--model {model}: {why}", why=why)


def resolve_model_dir(model: str) -> str:
    """A local directory holding the model: the path itself, or a Hugging Face hub snapshot."""
    p = os.path.abspath(os.path.expanduser(model))
    if os.path.isdir(p):
        if not os.path.exists(os.path.join(p, "config.json")):
            raise _model_dir_error(model, "directory has no config.json (not a Hugging Face model)")
        return p
    if os.path.exists(p) or model.startswith((".", "/", "~")):
        raise _model_dir_error(model, "no such model directory")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.bin"])
    except Exception as e:
        raise _model_dir_error(model, "not a local directory, and the Hugging Face hub could not provide it "
                                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def config_dtype(model_dir: str) -> str | None:
    """The dtype the model was saved in, from its config.json alone (`dtype`, formerly `torch_dtype`;
    a multimodal wrapper's `text_config` first), e.g. "bfloat16"; None when absent or unreadable."""
    import json
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    for c in (cfg.get("text_config") or {}, cfg):
        for key in ("dtype", "torch_dtype"):
            if isinstance(c.get(key), str):
                return c[key].replace("torch.", "")
    return None
