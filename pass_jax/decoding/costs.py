"""What one pass costs on this machine, by its shape: the cost model adaptive drafting reads.

A pass over B rows of T tokens costs about one row's pass on a GPU or TPU (the weights stream once),
but on a CPU a pass past a few dozen rows is compute-bound: at batch 8 the default tree's 12 tokens a
row are 96 rows, ~3x an autoregressive step, more than drafting can win back. So a plan measures its
round shapes once (the plan's backend, dtype and batch; the best of a few timed passes) and caches the
milliseconds per machine, model and dtype in ~/.cache/pass-jax/pass_costs.json (PASS_JAX_COST_CACHE).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from ..models.cache import KVCache
from ..models.contract import params_dtype

REPEATS = 5
CONTEXT = 128  # committed cache entries the timed passes attend to (attention is a small share)


def cache_path() -> Path:
    return Path(os.environ.get("PASS_JAX_COST_CACHE", "~/.cache/pass-jax/pass_costs.json")).expanduser()


def _machine() -> str:
    """The device kind, and the CPU's model name on a CPU (two CPUs of one kind name can differ in speed)."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return f"{dev.platform}:{dev.device_kind}:{jax.device_count()}"
    from ..backends.cpu.ffi import cpu_info

    return f"cpu:{cpu_info().get('model name', platform.processor())}:{os.cpu_count()}"


def cost_key(cfg, params, ops, batch: int, tokens: int) -> str:
    model = hashlib.sha256(repr(cfg).encode()).hexdigest()[:12]
    backend = ",".join([ops.name, *sorted(getattr(ops, "every_pass", ()))])
    return "|".join([_machine(), model, str(params_dtype(params)), backend, f"B{batch}", f"T{tokens}"])


def _time_pass(cfg, params, ops, batch: int, tokens: int) -> float:
    """Milliseconds of one forward pass plus its logits over [batch, tokens] (the best of REPEATS)."""
    @jax.jit
    def one(params, cache):
        embeds = jnp.zeros((batch, tokens, cfg.hidden_size), jnp.float32)
        positions = cache.lengths[:, None] + jnp.arange(tokens)[None]
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((tokens, tokens), bool)), (batch, tokens, tokens))
        hidden, cache = cfg.forward(params, embeds, positions, mask, cache, ops=ops)
        return cfg.logits(params, hidden, ops), cache

    cache = KVCache.create(cfg, batch, -(-(CONTEXT + tokens) // 64) * 64, params_dtype(params))
    cache = cache.replace(lengths=jnp.full((batch,), CONTEXT, jnp.int32))
    jax.block_until_ready(one(params, cache))
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        jax.block_until_ready(one(params, cache))
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def pass_costs(cfg, params, ops, batch: int, token_counts) -> tuple[float, ...]:
    """Milliseconds of a pass over [batch, T] for each T, measured once per machine and cached."""
    path = cache_path()
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    out, new = [], False
    for t in token_counts:
        key = cost_key(cfg, params, ops, batch, t)
        if key not in table:
            table[key], new = _time_pass(cfg, params, ops, batch, t), True
        out.append(float(table[key]))
    if new:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table, indent=0, sort_keys=True))
            tmp.replace(path)
        except OSError:  # a read-only home: measured again next time, decoding unaffected
            pass
    return tuple(out)


def relative(costs, digits: int = 2) -> tuple[float, ...]:
    """Costs over the cheapest, to `digits` significant digits: the plan's static copy, so that two
    measurements a few percent apart make the same program (and the same compile-cache entry)."""
    low = min(costs)
    return tuple(float(f"{c / low:.{digits - 1}e}") for c in costs)
