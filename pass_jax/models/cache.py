"""Fixed-size KV cache with per-row lengths.

`lengths[b]` counts the committed entries of row b. A forward pass writes its block of T new
entries at [lengths[b], lengths[b] + T) without committing them; the caller then commits as many
as it accepted. Anything at or beyond a row's length is invisible to attention, so rolling back
rejected drafts is only a matter of not advancing the length, and the next write overwrites them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from ..backends import resolve
from ..backends.xla import XlaOps, write_block  # noqa: F401 -- write_block: the cache's writer, also for callers


@struct.dataclass
class KVCache:
    keys: tuple[jax.Array, ...]  # per layer [batch, max_len, kv_heads, head_dim]
    values: tuple[jax.Array, ...]
    lengths: jax.Array  # [batch] int32, committed entries per row

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[1]

    @classmethod
    def create(cls, cfg, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        """Empty buffers for a decoder `cfg` (num_layers, num_kv_heads, head_dim: models.contract)."""
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(keys=zeros, values=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   lengths=jnp.zeros((batch,), jnp.int32))

    def commit(self, counts: jax.Array) -> KVCache:
        """Advance each row's length by counts[b] (entries already written by the last pass)."""
        return self.replace(lengths=self.lengths + counts.astype(jnp.int32))

    def gather_path(self, path: jax.Array, ops: XlaOps | None = None) -> KVCache:
        """Move each row's accepted tree nodes into a contiguous prefix of its uncommitted block.

        path [B, P]: block slot of the accepted node at depth d (the root, slot 0, at d = 0). Entry
        lengths[b] + path[b, d] moves to lengths[b] + d; entries past the accepted depth are garbage
        that the next commit leaves invisible.
        """
        ops = resolve(ops)
        move = lambda buf: ops.cache_move(buf, self.lengths, path)
        return self.replace(keys=tuple(map(move, self.keys)), values=tuple(map(move, self.values)))


def attention_mask(lengths: jax.Array, block_mask: jax.Array, max_len: int) -> jax.Array:
    """[B, T, max_len] visibility: committed keys (< length) plus the block's own keys per block_mask."""
    t = block_mask.shape[-1]
    key_idx = jnp.arange(max_len)[None, :]
    rel = key_idx - lengths[:, None]  # [B, S] index into the block
    committed = rel < 0
    in_block = (rel >= 0) & (rel < t)
    from_block = jnp.take_along_axis(block_mask, jnp.clip(rel, 0, t - 1)[:, None, :].repeat(t, 1), axis=2)
    return committed[:, None, :] | (in_block[:, None, :] & from_block)


def key_positions(lengths: jax.Array, positions: jax.Array, max_len: int) -> jax.Array:
    """RoPE position of every key slot: committed entries sit at their index, block entries at `positions`."""
    t = positions.shape[-1]
    key_idx = jnp.arange(max_len)[None, :]
    rel = key_idx - lengths[:, None]
    block_pos = jnp.take_along_axis(positions, jnp.clip(rel, 0, t - 1), axis=1)
    return jnp.where((rel >= 0) & (rel < t), block_pos, key_idx)
