"""Each self-data row's real-token pass, run once per sitting and reused by every step that draws the row.

The look-ahead loss first runs a batch's real tokens without gradient (`training.real_pass`): about
a third of a step. On self-generated data the same few hundred rows recur for many epochs, and that
pass does not depend on the look-ahead, so it is run once per row, in fixed chunks of rows (a resumed
run computes the same numbers), and its keys/values and hidden states are kept in host memory.
"""

from __future__ import annotations

import os
import sys

import numpy as np


def bytes_per_row(cfg, seq_len: int, dtype) -> int:
    """Host bytes one row's real pass takes: keys and values of every layer, and the hidden states."""
    import jax.numpy as jnp

    kv = 2 * cfg.num_layers * seq_len * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize  # "bfloat16" too
    return kv + seq_len * cfg.hidden_size * 4


def available_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not on every platform: then assume it does not fit
        return 0


class RealPasses:
    """hidden [N, L, D] and per-layer keys/values [N, L, KV, hd] of every row, looked up by row index."""

    def __init__(self, params, cfg, tokens: np.ndarray, chunk: int, mesh, quiet: bool = False):
        import jax
        from tqdm import tqdm

        from pass_jax.lookahead.training import real_pass
        from pass_jax.sharding import shard_batch

        n, length = tokens.shape
        run = jax.jit(lambda p, x: real_pass(p, cfg, x))
        self.hidden = np.empty((n, length, cfg.hidden_size), np.float32)
        self.keys = self.values = None
        for start in tqdm(range(0, n, chunk), desc="real-token passes", unit="chunk", file=sys.stderr, disable=quiet):
            rows = np.minimum(np.arange(start, start + chunk), n - 1)  # the last chunk repeats its last row
            hidden, cache = run(params, shard_batch(tokens[rows], mesh))
            if self.keys is None:
                self.keys, self.values = ([np.empty((n,) + k.shape[1:], k.dtype) for k in kv]
                                          for kv in (cache.keys, cache.values))
            m = min(chunk, n - start)
            self.hidden[start:start + m] = np.asarray(hidden)[:m]
            for store, arrays in ((self.keys, cache.keys), (self.values, cache.values)):
                for s, a in zip(store, arrays):
                    s[start:start + m] = np.asarray(a)[:m]
        self.length = length

    def get(self, rows: np.ndarray, mesh):
        """(hidden, KVCache) of these rows, placed like a batch on the mesh: `lookahead_loss`'s `real`."""
        from pass_jax.models.cache import KVCache
        from pass_jax.sharding import CACHE_AXES, logical_sharding, place, shard_batch

        def entries(store):  # laid out like a generation cache: rows over "data", KV heads over "model"
            return tuple(place(x[rows], logical_sharding(CACHE_AXES, (len(rows),) + x.shape[1:], mesh)) for x in store)

        cache = KVCache(keys=entries(self.keys), values=entries(self.values),
                        lengths=shard_batch(np.full(len(rows), self.length, np.int32), mesh))
        return shard_batch(self.hidden[rows], mesh), cache
