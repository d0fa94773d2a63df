"""Numerics the decoders share: an RMS norm whose sum does not depend on the pass size, and gated MLPs."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, w: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """x / rms(x) * (offset + w) in float32 (Llama: offset 0; Gemma's (1 + w) norms: offset 1)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(_sum_in_fixed_order(x * x)[..., None] / x.shape[-1] + eps) * (offset + w.astype(jnp.float32))


def _sum_in_fixed_order(v: jax.Array) -> jax.Array:
    """Sum over the last axis by pairwise halving. XLA's own reduce sums a row in an order that depends
    on how many rows there are (on the CPU a 1-token and a 2-token pass disagreed in the last bit),
    which let a verify pass differ from a 1-token step; this order depends only on the row."""
    while v.shape[-1] > 1:
        if v.shape[-1] % 2:
            v = jnp.concatenate([v, jnp.zeros_like(v[..., :1])], -1)
        half = v.shape[-1] // 2
        v = v[..., :half] + v[..., half:]
    return v[..., 0]


@jax.custom_vjp
def swiglu(gate_up: jax.Array) -> jax.Array:
    """silu(gate) * up of the fused [..., 2F] gate/up output.

    The gradient is written out (training differentiates through every layer): it keeps the
    sigmoid from the forward pass and returns the fused [..., 2F] gradient in one pass, where
    autodiff recomputed the sigmoid's exp and divide and concatenated the two halves' gradients.
    """
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate_up):
    gate, up = jnp.split(gate_up, 2, axis=-1)
    sig = jax.nn.sigmoid(gate)
    return gate * sig * up, (gate_up, sig)


def _swiglu_bwd(res, grad):
    gate_up, sig = res
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return (jnp.concatenate([grad * up * sig * (1 + gate * (1 - sig)), grad * gate * sig], -1),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def geglu(gate_up: jax.Array) -> jax.Array:
    """gelu_tanh(gate) * up of the fused [..., 2F] gate/up output (Gemma's MLP)."""
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return jax.nn.gelu(gate, approximate=True) * up
