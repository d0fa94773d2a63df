"""What PaSS needs from a model (`Decoder`), and the primitives to write one with.

A decoder is a frozen, hashable object (a static argument of every jit: part of a plan's key) that
describes a model and computes with its params, a separate pytree:

- `embed(params, tokens, ops)` -> [B, T, D] float32, the inputs of tokens;
- `forward(params, embeds, positions, block_mask, cache, *, visible, prefix, prefix_rows, local_blocks,
  ops)` -> (hidden [B, T, D], cache): one pass over a block of T inputs (token embeddings or look-ahead
  vectors) at per-slot positions [B, T]. Every row sees its committed cache entries and the block's own
  entries where block_mask [B, T, T]; the block's keys/values are written at each row's length and not
  committed (`KVCache`: the decode loop commits what it accepts);
- `logits(params, hidden, ops)` -> float32 logits;
- attributes: `vocab_size`, `hidden_size` (the look-ahead width), `num_layers`, `num_kv_heads`,
  `head_dim` (the cache, the deep look-ahead's per-layer prefix), `max_position_embeddings`,
  `eos_token_ids`, `bos_token_id`, `architecture`.

`visible`, `prefix` / `prefix_rows` and `local_blocks` are what training and the deep look-ahead
ask of a pass. A decoder that takes its mask from `pass_mask` and runs its attention through
`attend_cached` gets all of them, and decodes with every method (the Llama family does; so does the
Flax NNX example in tests/test_decoder_contract.py). `ops` is the backend (pass_jax.backends).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from ..backends.xla import XlaOps
from .cache import KVCache, attention_mask, key_positions


@runtime_checkable
class Decoder(Protocol):
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    architecture: str

    def embed(self, params, tokens: jax.Array, ops: XlaOps | None = None) -> jax.Array: ...

    def forward(self, params, embeds: jax.Array, positions: jax.Array, block_mask: jax.Array | None, cache: KVCache,
                *, visible: jax.Array | None = None, prefix: jax.Array | None = None,
                prefix_rows: jax.Array | None = None, local_blocks: int | None = None,
                ops: XlaOps | None = None) -> tuple[jax.Array, KVCache]: ...

    def logits(self, params, hidden: jax.Array, ops: XlaOps | None = None) -> jax.Array: ...


def pass_mask(cache: KVCache, block_mask, positions, visible=None, window: int | None = None) -> jax.Array:
    """[B, T, max_len] keys each query sees: committed entries plus the block's own per block_mask (or
    `visible`, when given: training's rule), within `window` positions when the layer slides."""
    mask = attention_mask(cache.lengths, block_mask, cache.max_len) if visible is None else visible
    if window is not None:
        kpos = key_positions(cache.lengths, positions, cache.max_len)
        mask &= (positions[:, :, None] - kpos[:, None, :]) < window
    return mask


def attend_cached(ops: XlaOps, q, k, v, keys, values, lengths, mask, prefix=None, prefix_rows=None,
                  local_blocks: int | None = None):
    """One layer's attention through the cache: (out [B, T, H * hd] float32, keys, values).

    q [B, T, H, hd] and k, v [B, T, KV, hd] are the block's (RoPE applied); keys/values [B, S, KV, hd]
    the layer's cache buffers, returned with the block written at `lengths` (not committed). prefix
    [2, P, KV, hd]: deep look-ahead keys/values that only rows where prefix_rows [B, T] see.
    local_blocks=n (training): the block is T / n independent blocks of n, seeing the cache per mask
    and their own block causally; nothing is written."""
    if local_blocks is None:
        keys, values = ops.cache_write(keys, k, lengths), ops.cache_write(values, v, lengths)
        return ops.attention(q, keys, values, mask, prefix, prefix_rows), keys, values
    return ops.attention(q, keys, values, mask, prefix, prefix_rows, (k, v, local_blocks)), keys, values


def causal_block_mask(valid: jax.Array) -> jax.Array:
    """[B, T, T] lower-triangular mask restricted to valid block entries (valid [B, T] bool)."""
    t = valid.shape[1]
    return jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]


def embed_scale(cfg) -> float:
    """How much a decoder scales its token embeddings (Gemma's sqrt(d)); 1 where it declares none. A
    look-ahead built from the embedding table starts in the same units as the rows the model reads."""
    return float(getattr(cfg, "embed_scale", 1.0))


def params_dtype(params):
    """The dtype a model's params (and so its KV cache) are stored in: that of its first array."""
    return jax.tree.leaves(params)[0].dtype
