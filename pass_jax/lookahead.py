"""The look-ahead leaf: k vectors of size d_model, the only parameters PaSS adds.

They are appended as inputs after the token embeddings; the output at look-ahead i drafts the
token i positions after the next one.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

MAX_K = 16


def check_k(k) -> int:
    """k as a Python int, or a clear error when it is not an integer in 1..MAX_K."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= MAX_K:
        raise ValueError(f"look-ahead count k must be an integer in 1..{MAX_K}, got {k!r}")
    return int(k)


def init_lookahead(params: dict, k: int, how: str = "token", token_id: int = 0, key: jax.Array | None = None):
    """[k, d_model] float32 look-ahead embeddings.

    how="token": k copies of one token's embedding (the paper's untrained baseline, an [UNK]-like
    token); how="random": normal draws scaled to the token embeddings' standard deviation.
    """
    k = check_k(k)
    embed = params["embed"]
    if how == "token":
        if not 0 <= token_id < embed.shape[0]:
            raise ValueError(f"token_id {token_id} is outside the vocabulary (size {embed.shape[0]})")
        return jnp.tile(embed[token_id].astype(jnp.float32)[None], (k, 1))
    if how == "random":
        key = jax.random.key(0) if key is None else key
        std = jnp.std(embed.astype(jnp.float32))
        return std * jax.random.normal(key, (k, embed.shape[1]), jnp.float32)
    raise ValueError(f"unknown look-ahead initialisation {how!r}: use 'token' or 'random'")
