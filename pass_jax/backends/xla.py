"""The operations a pass is made of, behind one boundary, in XLA's ops: what TPUs and GPUs run.

`XlaOps` is the implementation and the interface: the model, the cache, the decode loop and training
call only these methods. Another backend subclasses it and overrides what it does better; the CPU
kernels do (`pass_jax.backends.cpu`). A decode plan picks its backend once (`DecodePlan.ops`, a static
field, so part of the jit key); `pass_jax.backends.default_ops` says which one suits this process.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class XlaOps:
    """Dense products, embedding rows, RoPE, attention over the cache and cache writes, in XLA's ops.

    Frozen and hashable: a plan holds one as a static field. `for_prefill` / `for_rounds` are the
    variants the decode loop traces its prompt pass and its rounds with (the same ops here)."""

    name = "xla"

    def for_prefill(self) -> XlaOps:
        return self

    def for_rounds(self) -> XlaOps:
        return self

    def dense(self, x: jax.Array, w: jax.Array) -> jax.Array:
        """x [..., K] @ w [K, N], accumulated in float32 whatever the weight dtype."""
        return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)

    def dense_t(self, x: jax.Array, w: jax.Array) -> jax.Array:
        """x [..., K] @ w.T for w [N, K] (a tied head reusing the embedding table), in float32."""
        return jnp.einsum("...d,vd->...v", x.astype(w.dtype), w, preferred_element_type=jnp.float32)

    def embed(self, table: jax.Array, tokens: jax.Array) -> jax.Array:
        """float32 rows of `table` [V, D] at `tokens` (any shape) -> [..., D]."""
        return table[tokens].astype(jnp.float32)

    def rope(self, heads: jax.Array, positions: jax.Array, inv_freq: jax.Array, rotated: int) -> jax.Array:
        """Rotate-half RoPE (as Hugging Face Llama) of the first `rotated` heads of heads [B, T, H, hd] at
        positions [B, T]; the other heads (values) pass through."""
        return jnp.concatenate([rotate_half_rope(heads[:, :, :rotated], positions, inv_freq), heads[:, :, rotated:]], 2)

    def attention(self, q, keys, values, mask, prefix=None, prefix_rows=None, local=None) -> jax.Array:
        """Grouped-query attention of q [B, T, H, hd] over the cache buffer keys/values [B, S, KV, hd] where
        mask [B, T, S]; returns [B, T, H * hd] float32.

        prefix [2, P, KV, hd] (deep look-ahead keys and values) joins the softmax of the rows where
        prefix_rows [B, T]; every other row computes exactly what it computes without it. local = (keys,
        values [B, T, KV, hd], n): the pass's own entries, not in the buffer, seen in blocks of n slots
        (training's look-ahead blocks), each row its block's slots up to its own."""
        rows = to_rows(q, keys.dtype, keys.shape[2])
        groups = rows.shape[2] // q.shape[1]
        out, top, mass = self.attend(rows, keys, values, mask)
        seen = None if prefix is None else (prefix.astype(keys.dtype), jnp.repeat(prefix_rows, groups, axis=1))
        if local is not None:  # the prefix joins each block's own keys: one small softmax instead of a fold
            out, top, mass = merge((out, top, mass), attend_local(rows, *local, seen))
        elif prefix is not None:
            out = fold_prefix(rows, top, mass, out, *seen)
        return from_rows(out, q.shape)

    def attend(self, rows, keys, values, mask):
        """rows [B, KV, R, hd] over keys/values [B, S, KV, hd] where mask [B, T, S] (R = T x groups):
        (out [B, KV, R, hd] float32, each row's max score, its sum of exp(score - max))."""
        return attend(rows, keys, values, mask)

    def cache_write(self, buf: jax.Array, block: jax.Array, offsets: jax.Array) -> jax.Array:
        """buf[b, offsets[b] : offsets[b] + T] = block[b] for every row b (in place under jit)."""
        return write_block(buf, block, offsets)

    def cache_move(self, buf: jax.Array, lengths: jax.Array, path: jax.Array) -> jax.Array:
        """Entry lengths[b] + path[b, d] of buf [B, S, KV, hd] to lengths[b] + d (an accepted tree path)."""
        idx = (lengths[:, None] + path)[:, :, None, None]
        return write_block(buf, jnp.take_along_axis(buf, idx, axis=1), lengths)


XLA = XlaOps()


def write_block(buf: jax.Array, block: jax.Array, offsets: jax.Array) -> jax.Array:
    """buf[b, offsets[b] : offsets[b] + T] = block[b] for every row b, any trailing shape."""
    return jax.vmap(lambda c, x, o: jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), o, axis=0))(
        buf, block, offsets)


def rotate_half_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x [B, T, heads, hd] rotated by positions [B, T] x inv_freq [hd / 2]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    half = x.shape[-1] // 2
    return x * cos + jnp.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def to_rows(q: jax.Array, dtype, kv: int) -> jax.Array:
    """q [B, T, H, hd] as each KV head's T x groups query rows [B, KV, T * groups, hd], ordered (t, group)."""
    b, t, nq, hd = q.shape
    return q.reshape(b, t, kv, nq // kv, hd).astype(dtype).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * (nq // kv), hd)


def from_rows(out: jax.Array, q_shape) -> jax.Array:
    """`to_rows`' inverse for the attention output: [B, KV, T * groups, hd] -> [B, T, H * hd]."""
    b, t, nq, hd = q_shape
    kv = out.shape[1]
    return out.reshape(b, kv, t, nq // kv, hd).transpose(0, 2, 1, 3, 4).reshape(b, t, nq * hd)


def attend(rows, keys, values, mask):
    """`XlaOps.attend`: two batched products over [B, KV] (1.5-1.8x faster on the CPU than batching over
    [B, KV, groups] in bfloat16)."""
    hd, groups = rows.shape[-1], rows.shape[2] // mask.shape[1]
    keys_t, values_t = keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)  # [B, KV, S, hd]
    scores = jnp.einsum("bkrd,bksd->bkrs", rows, keys_t, preferred_element_type=jnp.float32) * (hd ** -0.5)
    scores = jnp.where(jnp.repeat(mask, groups, axis=1)[:, None], scores, -1e30)
    top = scores.max(-1)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkrs,bksd->bkrd", probs.astype(values.dtype), values_t, preferred_element_type=jnp.float32)
    return out, top, jnp.sum(jnp.exp(scores - top[..., None]), -1)


def attend_local(rows, keys, values, n: int, prefix=None):
    """rows [B, KV, T * groups, hd] over the pass's own keys/values [B, T, KV, hd], cut into blocks of n
    slots: a row sees the slots of its block up to its own, and, given prefix = (keys/values [2, P, KV,
    hd], seen [B, R]), the P prefix entries where seen. Returns (out, top, mass) as `attend` does."""
    b, kv, r, hd = rows.shape
    t = keys.shape[1]
    groups, blocks = r // t, t // n
    q = rows.reshape(b, kv, blocks, n * groups, hd)
    kb, vb = (x.astype(rows.dtype).transpose(0, 2, 1, 3).reshape(b, kv, blocks, n, hd) for x in (keys, values))
    scores = jnp.einsum("bkpqd,bkpjd->bkpqj", q, kb, preferred_element_type=jnp.float32)
    sees = jnp.broadcast_to(jnp.arange(n * groups)[:, None] // groups >= jnp.arange(n)[None, :],  # query slot >= key slot
                            (b, 1, blocks, n * groups, n))
    if prefix is not None:  # its scores join the block's (the P entries are shared: never copied per block)
        (pk, pv), seen = prefix[0].astype(rows.dtype), prefix[1]
        scores = jnp.concatenate([jnp.einsum("bkpqd,jkd->bkpqj", q, pk, preferred_element_type=jnp.float32), scores], -1)
        sees = jnp.concatenate([jnp.broadcast_to(seen.reshape(b, 1, blocks, n * groups, 1), sees.shape[:-1] + (pk.shape[0],)),
                                sees], -1)
    scores = jnp.where(sees, scores * (hd ** -0.5), -1e30)
    top = scores.max(-1)
    weights = jnp.exp(scores - top[..., None])
    mass = weights.sum(-1)
    p = 0 if prefix is None else prefix[0].shape[1]
    out = jnp.einsum("bkpqj,bkpjd->bkpqd", weights[..., p:].astype(vb.dtype), vb, preferred_element_type=jnp.float32)
    if prefix is not None:
        out = out + jnp.einsum("bkpqj,jkd->bkpqd", weights[..., :p].astype(pv.dtype), pv, preferred_element_type=jnp.float32)
    return (out / mass[..., None]).reshape(b, kv, r, hd), top.reshape(b, kv, r), mass.reshape(b, kv, r)


def merge(a, b):
    """One softmax over two disjoint key sets, from each set's (out, max score, mass)."""
    (out_a, top_a, mass_a), (out_b, top_b, mass_b) = a, b
    top = jnp.maximum(top_a, top_b)
    wa, wb = mass_a * jnp.exp(top_a - top), mass_b * jnp.exp(top_b - top)
    return (wa[..., None] * out_a + wb[..., None] * out_b) / (wa + wb)[..., None], top, wa + wb


def fold_prefix(rows, top, mass, out, prefix, seen):
    """Attention over the cache plus P learned keys/values (deep look-ahead), as one softmax over both.

    The cache part is already normalized (out, with its max score `top` and mass sum(exp(score - top)));
    the prefix joins it by log-sum-exp weights, so the cache is never copied (concatenating P entries
    to it copied the whole buffer in every layer of every pass). Rows where `seen` is false keep `out`
    bit for bit: real tokens compute exactly what they do without a prefix. rows [B, KV, R, hd]
    queries, top and mass [B, KV, R], out [B, KV, R, hd], prefix [2, P, KV, hd], seen [B, R].
    """
    pscores = jnp.einsum("bkrd,pkd->bkrp", rows, prefix[0], preferred_element_type=jnp.float32) * (rows.shape[-1] ** -0.5)
    both = jnp.maximum(top, pscores.max(-1))[..., None]  # [B, KV, R, 1]
    cache_mass = (mass * jnp.exp(top - both[..., 0]))[..., None]
    pweights = jnp.exp(pscores - both)
    pout = jnp.einsum("bkrp,pkd->bkrd", pweights.astype(prefix.dtype), prefix[1], preferred_element_type=jnp.float32)
    folded = (cache_mass * out + pout) / (cache_mass + pweights.sum(-1, keepdims=True))
    return jnp.where(seen[:, None, :, None], folded, out)
