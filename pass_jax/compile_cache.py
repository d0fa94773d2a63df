"""JAX's persistent compilation cache: a second identical run loads its executables from disk instead
of compiling them again (the command line turns it on; call `enable` to do the same in a program)."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "PASS_JAX_COMPILE_CACHE"  # a directory, or "off"
DEFAULT_DIR = "~/.cache/pass-jax/xla"
OFF = ("0", "off", "none", "false", "")


def enable(path: str | os.PathLike | None = None) -> Path | None:
    """Cache compiled programs under `path` (default: $PASS_JAX_COMPILE_CACHE, else ~/.cache/pass-jax/xla);
    "off" (or "0") leaves the cache off. Returns the directory used, or None when off.

    Every program is cached, however quickly it compiled: the decode loop's many small programs add up,
    and a cache hit is what lets the same `generate` start in seconds."""
    import jax

    setting = str(path) if path is not None else os.environ.get(ENV, DEFAULT_DIR)
    if setting.strip().lower() in OFF:
        return None
    where = Path(setting).expanduser()
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"compile cache {where}: cannot create it ({e.strerror}); pass another directory or 'off'")
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return where
