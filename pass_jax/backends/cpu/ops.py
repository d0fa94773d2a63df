"""`CpuOps`: the XLA ops with pass-jax's CPU kernels (ffi.py) wherever they serve a pass better.

A decode pass on one CPU device is made of few-row products, attention over the cache, RoPE, embedding
rows and cache writes: XLA's CPU backend runs each of them below what the machine allows (or, for
bfloat16 gathers and updates, widens whole arrays), so each is a kernel call here. Where a kernel does
not take an input (a dtype, a head size, a pass past MAX_ROWS rows) the XLA op runs. Gradients
(training) go through the kernels' written-out rules below or XLA's ops.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from .. import xla
from . import ffi

EVERY_PASS = frozenset({"attention", "products"})


@dataclasses.dataclass(frozen=True)
class XlaCpuOps(xla.XlaOps):
    """XLA's ops on a CPU, with the one workaround XLA's CPU backend needs: a one-row bfloat16 product
    takes a slow path there (~1.7x two rows' time, and other arithmetic than a many-row pass), so a lone
    row is doubled and the copy dropped. What a CPU without the kernels runs (`default_ops`)."""

    name = "xla-cpu"

    def dense(self, x, w):
        if w.dtype == jnp.bfloat16 and math.prod(x.shape[:-1]) == 1:
            flat = x.astype(w.dtype).reshape(1, -1)
            y = jnp.dot(jnp.concatenate([flat, flat]), w, preferred_element_type=jnp.float32)[:1]
            return y.reshape(x.shape[:-1] + (w.shape[-1],))
        return super().dense(x, w)


@dataclasses.dataclass(frozen=True)
class CpuOps(XlaCpuOps):
    """every_pass: the kinds of kernel ("attention", "products") taken at any pass size, not only up to
    MAX_ROWS rows. The decode loop traces its rounds with both (`for_rounds`), so a token is computed by
    the same arithmetic in a 1-token step and in a verify pass of any size, and its prompt pass with the
    attention kernel at any length (`for_prefill`), so a prompt's cache entries do not depend on the
    cache buffer's length (which differs between methods): greedy PaSS stays autoregressive decoding
    bit for bit. A field, hence part of every plan's jit key."""

    every_pass: frozenset = frozenset()
    name = "cpu"

    def __post_init__(self):
        if not ffi.available():  # builds and registers the kernels once per process
            raise ValueError("the CPU kernels are not available in this process (see the warning): use XLA's ops")

    def for_prefill(self) -> CpuOps:
        return dataclasses.replace(self, every_pass=frozenset({"attention"}))

    def for_rounds(self) -> CpuOps:
        return dataclasses.replace(self, every_pass=EVERY_PASS)

    def _few(self, rows: int, kind: str) -> bool:
        return rows <= ffi.MAX_ROWS or kind in self.every_pass

    def dense(self, x, w):
        rows = math.prod(x.shape[:-1])
        if ffi.dense_applies(w) and self._few(rows, "products"):
            return ffi.dense(x, w)
        return super().dense(x, w)

    def dense_t(self, x, w):
        if ffi.dense_applies(w) and self._few(math.prod(x.shape[:-1]), "products"):
            return ffi.dense(x, w, transposed=True)
        return super().dense_t(x, w)

    def embed(self, table, tokens):
        return ffi.rows(table, tokens) if ffi.rows_apply(table) else super().embed(table, tokens)

    def rope(self, heads, positions, inv_freq, rotated):
        """One kernel call for q and k: XLA fused RoPE's ops into their consumers differently for 1-token
        and many-token passes, so a token's q and k came out a bit apart between the two, enough to flip
        a bfloat16 rounding, then a near-tied greedy token."""
        if ffi.rope_applies(heads):
            return ffi.rope(heads, positions, inv_freq, rotated)
        return super().rope(heads, positions, inv_freq, rotated)

    def attention(self, q, keys, values, mask, prefix=None, prefix_rows=None, local=None):
        if local is not None and ffi.block_attention_applies(q, keys):  # training's blocks: forward and gradient
            return _block_attention(local[2], q, keys, values, mask, local[0], local[1], prefix, prefix_rows)
        if prefix is not None and local is None and prefix.shape[1] <= ffi.MAX_PREFIX:
            rows = xla.to_rows(q, keys.dtype, keys.shape[2])
            if self._attends(rows, keys, mask):  # a deep look-ahead's prefix folded into the one softmax
                return xla.from_rows(_attend_folded(rows, keys, values, mask, prefix.astype(keys.dtype), prefix_rows),
                                     q.shape)
        return super().attention(q, keys, values, mask, prefix, prefix_rows, local)

    def _attends(self, rows, keys, mask) -> bool:
        return ffi.attention_applies(rows, keys) and self._few(mask.shape[1], "attention")

    def attend(self, rows, keys, values, mask):
        if self._attends(rows, keys, mask):
            return _attend(rows, keys, values, mask)
        return super().attend(rows, keys, values, mask)

    def cache_write(self, buf, block, offsets):
        if block.ndim == 4 and ffi.cache_applies(buf):
            return ffi.cache_write(buf, block, offsets)
        return super().cache_write(buf, block, offsets)

    def cache_move(self, buf, lengths, path):
        return ffi.cache_move(buf, lengths, path) if ffi.cache_applies(buf) else super().cache_move(buf, lengths, path)


# ---- gradients of the attention kernels: through XLA's ops (they only flow in training) ---------------
@jax.custom_vjp
def _attend(rows, keys, values, mask):
    return ffi.attention(rows, keys, values, mask)


def _attend_fwd(rows, keys, values, mask):
    return _attend(rows, keys, values, mask), (rows, keys, values, mask)


def _attend_bwd(res, g):
    rows, keys, values, mask = res
    _, vjp = jax.vjp(lambda r, k, v: xla.attend(r, k, v, mask), rows, keys, values)
    return (*vjp(g), None)


_attend.defvjp(_attend_fwd, _attend_bwd)


@jax.custom_vjp
def _attend_folded(rows, keys, values, mask, prefix, prefix_rows):
    """`xla.attend` then `xla.fold_prefix` as one kernel call (decode passes with a deep look-ahead)."""
    return ffi.attention(rows, keys, values, mask, prefix, prefix_rows)[0]


def _attend_folded_xla(rows, keys, values, mask, prefix, prefix_rows):
    out, top, mass = xla.attend(rows, keys, values, mask)
    return xla.fold_prefix(rows, top, mass, out, prefix, jnp.repeat(prefix_rows, rows.shape[2] // mask.shape[1], axis=1))


def _attend_folded_fwd(*args):
    return _attend_folded(*args), args


def _attend_folded_bwd(res, g):
    rows, keys, values, mask, prefix, prefix_rows = res
    _, vjp = jax.vjp(lambda r, k, v, p: _attend_folded_xla(r, k, v, mask, p, prefix_rows), rows, keys, values, prefix)
    dr, dk, dv, dp = vjp(g)
    return dr, dk, dv, None, dp, None


_attend_folded.defvjp(_attend_folded_fwd, _attend_folded_bwd)


def _block_attention(n, q, keys, values, visible, local_k, local_v, prefix, prefix_rows):
    """`XlaOps.attention` with local blocks of n, by the block-attention kernels."""
    b, t, nq, hd = q.shape
    if prefix is None:  # P = 0 entries
        prefix = jnp.zeros((2, 0, *keys.shape[2:]), jnp.float32)
    if prefix_rows is None:
        prefix_rows = jnp.ones((b, t), bool)
    return _block_kernel(n, q, keys, values, visible, local_k, local_v, prefix, prefix_rows).reshape(b, t, nq * hd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _block_kernel(n, q, keys, values, visible, local_k, local_v, prefix, prefix_rows):
    return ffi.block_attention(n, q, keys, values, visible, local_k, local_v, prefix, prefix_rows)[0]


def _block_kernel_fwd(n, *args):
    out, lse = ffi.block_attention(n, *args)
    return out, (args, out, lse)


def _block_kernel_bwd(n, res, g):
    """The kernel's gradient for queries, block entries and prefix; the cache's through XLA's ops, which
    XLA drops where the cache is a constant (training: the real tokens' pass has no gradient)."""
    args, out, lse = res
    q, keys, values, visible, local_k, local_v, prefix, prefix_rows = args
    dq, d_local_k, d_local_v, d_prefix = ffi.block_attention_grad(n, *args, out, lse, g)
    _, vjp = jax.vjp(lambda k, v: xla.XLA.attention(q, k, v, visible, prefix if prefix.shape[1] else None, prefix_rows,
                                                    (local_k, local_v, n)).reshape(out.shape), keys, values)
    d_keys, d_values = vjp(g)
    cast = lambda d, x: d.astype(x.dtype)
    return (cast(dq, q), d_keys, d_values, None, cast(d_local_k, local_k), cast(d_local_v, local_v),
            cast(d_prefix, prefix), None)


_block_kernel.defvjp(_block_kernel_fwd, _block_kernel_bwd)
