"""Resolve a --model argument: a local directory or .gguf file, else a Hugging Face Hub id."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ConfigError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
              "tokenizer*", "special_tokens_map.json", "*.jinja"]


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A local path as given; an `org/name` that is not on disk is fetched with snapshot_download.

    A failed download (offline machine, unknown repo) is one clear error, never a hang: the hub
    client's short connection timeout applies and every exception is reported in one line.
    """
    path = Path(model)
    text = str(model)
    if path.exists() or not _HUB_ID.fullmatch(text) or text.endswith(".gguf"):
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=_HUB_FILES, etag_timeout=10))
    except Exception as e:  # noqa: BLE001 -- offline, DNS failure, 401/404, missing huggingface_hub...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{text!r} is not a local directory or file, and the Hugging Face Hub is unreachable "
                          f"or has no such model ({reason}): pass a local model directory or .gguf file") from None
