"""The look-ahead leaf: k vectors of size d_model, the only parameters PaSS adds.

They are appended as inputs after the token embeddings; the output at look-ahead i drafts the
token i positions after the next one.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from flax import struct

MAX_K = 16


def check_k(k) -> int:
    """k as a Python int, or a clear error when it is not an integer in 1..MAX_K."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= MAX_K:
        raise ValueError(f"look-ahead count k must be an integer in 1..{MAX_K}, got {k!r}")
    return int(k)


def init_lookahead(params: dict, k: int, how: str = "token", token_id: int = 0, key: jax.Array | None = None,
                   embed_scale: float = 1.0):
    """[k, d_model] float32 look-ahead embeddings, made of the input embeddings `params["embed"]` times
    embed_scale (a decoder's `embed_scale`, where it scales its inputs as Gemma does).

    how="token": k copies of one token's embedding (the paper's untrained baseline, an [UNK]-like
    token); how="mean": k copies of the mean token embedding, a start that reads the context (an
    UNK-like token that doubles as the end-of-text separator, as in SmolLM2, tells the model to ignore
    it); how="random": normal draws scaled to the token embeddings' standard deviation.
    """
    k = check_k(k)
    embed = params["embed"].astype(jnp.float32) * embed_scale
    if how == "token":
        if not 0 <= token_id < embed.shape[0]:
            raise ValueError(f"token_id {token_id} is outside the vocabulary (size {embed.shape[0]})")
        return jnp.tile(embed[token_id][None], (k, 1))
    if how == "mean":
        return jnp.tile(jnp.mean(embed, 0)[None], (k, 1))
    if how == "random":
        key = jax.random.key(0) if key is None else key
        std = jnp.std(embed)
        return std * jax.random.normal(key, (k, embed.shape[1]), jnp.float32)
    raise ValueError(f"unknown look-ahead initialisation {how!r}: use 'token', 'mean' or 'random'")


@struct.dataclass
class DeepLookahead:
    """Deep look-ahead (`--deep`): the k embeddings plus, per layer, P learned key/value pairs that only
    look-ahead positions attend to. Real tokens never see them, so decoding stays exact; the whole
    struct is the one trained leaf. Slicing [:k] slices the embeddings (the prefix is shared)."""

    embeds: jax.Array  # [k, D]
    prefix: jax.Array  # [layers, 2, P, kv_heads, head_dim]

    @property
    def shape(self):
        return self.embeds.shape

    def __getitem__(self, idx):
        return self.replace(embeds=self.embeds[idx])


def split_lookahead(lookahead):
    """(embeddings [k, D] float32, deep prefix or None) of a plain or deep look-ahead."""
    if isinstance(lookahead, DeepLookahead):
        return jnp.asarray(lookahead.embeds, jnp.float32), jnp.asarray(lookahead.prefix, jnp.float32)
    return jnp.asarray(lookahead, jnp.float32), None


def init_deep(embeds, cfg, prefix_len: int, key: jax.Array | None = None) -> DeepLookahead:
    """A deep look-ahead around plain embeddings, with near-zero keys and values: at the start each
    prefix slot is an almost empty extra key to the look-aheads; training gives it content."""
    if not 1 <= prefix_len <= 64:
        raise ValueError(f"deep look-ahead prefix length must be in 1..64, got {prefix_len}")
    key = jax.random.key(0) if key is None else key
    shape = (cfg.num_layers, 2, prefix_len, cfg.num_kv_heads, cfg.head_dim)
    return DeepLookahead(jnp.asarray(embeds, jnp.float32), 0.02 * jax.random.normal(key, shape, jnp.float32))
