"""Fair wall-clock comparisons: the first execution after compiling is ~20% slower than later ones
(SmolLM2-135M: 1.98 s, then 1.82 s, 1.63 s for the same 64 tokens), so no timed run may be one."""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Callable
from pathlib import Path

from pass_jax import GenerationResult

Run = Callable[[], GenerationResult]


def machine(**extra) -> dict:
    """Where a benchmark ran, for its JSON: the same command gives other ratios on another CPU (a
    16-token pass cost 2.8x a 1-token pass on one 2-core machine here, 1.5x on another)."""
    import jax

    from pass_jax.backends.cpu.ffi import cpu_info

    info = cpu_info() or {"model name": platform.processor()}
    l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    cpu = " ".join(filter(None, [info.get("model name"), info.get("cpu family") and
                                 f"(family {info['cpu family']} model {info.get('model')} stepping {info.get('stepping')})",
                                 l3.is_file() and f"L3 {l3.read_text().strip()}"]))
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
            "device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind, **extra}


def _with_compile(res: GenerationResult, compile_seconds: float) -> GenerationResult:
    return dataclasses.replace(res, stats=dataclasses.replace(res.stats, compile_seconds=compile_seconds))


def warm(run: Run) -> GenerationResult:
    """run(), and when that call compiled, run() again: the result returned is never a first execution."""
    res = run()
    if res.stats.compile_seconds > 0:
        res = _with_compile(run(), res.stats.compile_seconds)
    return res


def alternate_medians(runs: dict[str, Run], repeats: int = 3) -> dict[str, GenerationResult]:
    """Each run once untimed (compile, warm up), then all in turn `repeats` times; per run, the result
    of median wall time (with the first call's compile time), so no method is timed under other conditions."""
    first = {name: run() for name, run in runs.items()}
    timed: dict[str, list[GenerationResult]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            timed[name].append(run())
    return {name: _with_compile(sorted(res, key=lambda r: r.stats.seconds)[(len(res) - 1) // 2],
                                first[name].stats.compile_seconds) for name, res in timed.items()}
