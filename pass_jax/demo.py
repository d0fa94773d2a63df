"""The embedded demo code model and its trained look-ahead embeddings, shipped as package data.

Made by the commands in pass_jax/demo_model/README.md (pretrained on the Python standard library).
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"
DEMO_LOOKAHEAD = DEMO_MODEL / "lookahead"


def demo_model_dir() -> str:
    if not (DEMO_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"the embedded demo model is missing from {DEMO_MODEL}: reinstall pass-jax, "
                                "or pass --model DIR")
    return str(DEMO_MODEL)


def demo_lookahead_dir() -> str | None:
    return str(DEMO_LOOKAHEAD) if (DEMO_LOOKAHEAD / "lookahead.json").is_file() else None
