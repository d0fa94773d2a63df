"""The LLaMA-family decoder as pure functions of (params, cache, inputs, positions).

Params are a plain dict: {"embed": [V, D], "norm": [D], "lm_head": [D, V] (absent when tied),
"layers": [{"attn_norm", "qkv" [D, (H + 2 KV) * hd], "qkv_bias"?, "o", "o_bias"?, "mlp_norm",
"gate_up" [D, 2F], "down"}, ...]}. q/k/v and gate/up are fused so a decode step streams each
layer's weights in as few matrix-vector products as possible. Layers are a Python list, unrolled
under jit: a scan over stacked layers would copy each layer's slice on the CPU backend.

Products, embedding rows, RoPE, attention and cache writes go through `ops` (pass_jax.ops: XLA's
ops, or a backend's; None = `backends.default_ops()`, this process's choice).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .backends import resolve
from .cache import KVCache, attention_mask, key_positions
from .config import ModelConfig, rope_inv_freq
from .ops import XlaOps

Params = dict


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(_sum_in_fixed_order(x * x)[..., None] / x.shape[-1] + eps) * w.astype(jnp.float32)


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


def embed_tokens(params: Params, tokens: jax.Array, ops: XlaOps | None = None) -> jax.Array:
    """The rows of `tokens`, in float32."""
    return resolve(ops).embed(params["embed"], tokens)


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


def forward(params: Params, cfg: ModelConfig, embeds: jax.Array, positions: jax.Array,
            block_mask: jax.Array, cache: KVCache, visible: jax.Array | None = None, prefix: jax.Array | None = None,
            prefix_rows: jax.Array | None = None, local_blocks: int | None = None,
            ops: XlaOps | None = None) -> tuple[jax.Array, KVCache]:
    """Run a block of T new inputs through the decoder.

    embeds [B, T, D] (token embeddings or look-ahead vectors), positions [B, T] RoPE positions,
    block_mask [B, T, T] which block entries each query sees (on top of every committed entry).
    The block's keys/values are written at each row's cache length but not committed.
    visible [B, T, max_len], when given, replaces that rule (training: a look-ahead block sees the
    real tokens only up to its insertion point). prefix [layers, 2, P, KV, hd] (deep look-ahead):
    learned keys/values that only the rows where prefix_rows [B, T] attend to, before the cache;
    every other row computes exactly what it computes without them.
    local_blocks=n (training): the T inputs are T / n independent blocks of n that see the cache per
    `visible` plus their own block causally; their keys/values are not written (the buffer stays as
    long as the real tokens, and no row scores the other blocks' entries).
    Returns the final-normed hidden states [B, T, D] and the cache with the block written.
    """
    ops = resolve(ops)
    mask = attention_mask(cache.lengths, block_mask, cache.max_len) if visible is None else visible
    if cfg.sliding_window is not None:
        kpos = key_positions(cache.lengths, positions, cache.max_len)
        mask &= (positions[:, :, None] - kpos[:, None, :]) < cfg.sliding_window
    x = embeds.astype(jnp.float32)
    keys, values = list(cache.keys), list(cache.values)
    for i, layer in enumerate(params["layers"]):
        x, keys[i], values[i] = _layer(layer, x, keys[i], values[i], cache.lengths, positions, mask,
                                       None if prefix is None else prefix[i], prefix_rows, cfg=cfg, ops=ops,
                                       local_blocks=local_blocks)
    hidden = rms_norm(x, params["norm"], cfg.rms_norm_eps)
    return hidden, cache.replace(keys=tuple(keys), values=tuple(values))


@functools.partial(jax.jit, static_argnames=("cfg", "ops", "local_blocks"))
def _layer(layer, x, keys, values, lengths, positions, mask, prefix, prefix_rows, *, cfg: ModelConfig, ops: XlaOps,
           local_blocks: int | None):
    """One decoder layer of `forward`: (x, the layer's keys and values with the block written).

    Jitted on its own, so tracing a pass traces one layer, not every layer (they share their shapes);
    XLA inlines the call, so the compiled program computes what the unrolled layers computed."""
    b, t = x.shape[:2]
    nq, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = ops.dense(rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps), layer["qkv"])
    if "qkv_bias" in layer:
        qkv = qkv + layer["qkv_bias"].astype(jnp.float32)
    heads = ops.rope(qkv.reshape(b, t, nq + 2 * nkv, hd), positions, jnp.asarray(rope_inv_freq(cfg)), nq + nkv)
    q, k, v = heads[:, :, :nq], heads[:, :, nq:nq + nkv], heads[:, :, nq + nkv:]  # q and k rotated
    local = None
    if local_blocks is None:
        keys, values = ops.cache_write(keys, k, lengths), ops.cache_write(values, v, lengths)
    else:
        local = (k, v, local_blocks)
    attn = ops.dense(ops.attention(q, keys, values, mask, prefix, prefix_rows, local), layer["o"])
    x = x + (attn + layer["o_bias"].astype(jnp.float32) if "o_bias" in layer else attn)
    x = x + ops.dense(swiglu(ops.dense(rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps), layer["gate_up"])),
                      layer["down"])
    return x, keys, values


def logits_from_hidden(params: Params, hidden: jax.Array, ops: XlaOps | None = None) -> jax.Array:
    """float32 logits; a tied head reuses the embedding matrix."""
    ops = resolve(ops)
    return ops.dense(hidden, params["lm_head"]) if "lm_head" in params else ops.dense_t(hidden, params["embed"])


def causal_block_mask(valid: jax.Array) -> jax.Array:
    """[B, T, T] lower-triangular mask restricted to valid block entries (valid [B, T] bool)."""
    t = valid.shape[1]
    return jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]


def param_axes(cfg: ModelConfig) -> dict:
    """Logical axis names of every parameter: the same tree as `init_params`, a name per dimension.

    `sharding.LOGICAL_RULES` maps the names to mesh axes, so the layout is declared here, once,
    for training and generation alike, instead of guessed from shapes. "qkv" is the fused
    [q heads | k heads | v heads] output and "mlp" the fused [gate | up] output (and down's input).
    """
    layer = {"attn_norm": ("norm",), "qkv": ("embed", "qkv"), "o": ("heads", "embed"), "mlp_norm": ("norm",),
             "gate_up": ("embed", "mlp"), "down": ("mlp", "embed")}
    if cfg.attention_bias:
        layer["qkv_bias"] = ("qkv",)
    if cfg.o_bias:
        layer["o_bias"] = ("norm",)
    axes = {"embed": ("vocab", "embed"), "layers": [dict(layer) for _ in range(cfg.num_layers)], "norm": ("norm",)}
    if not cfg.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> Params:
    """Random params (normal * scale, norms at 1): for tests, benchmarks and pretraining."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
    keys = iter(jax.random.split(key, 4 * cfg.num_layers + 2))

    def normal(shape):
        return (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    layers = []
    for _ in range(cfg.num_layers):
        layer = {"attn_norm": jnp.ones((d,), dtype), "qkv": normal((d, qkv_out)), "o": normal((cfg.num_heads * hd, d)),
                 "mlp_norm": jnp.ones((d,), dtype), "gate_up": normal((d, 2 * f)), "down": normal((f, d))}
        if cfg.attention_bias:
            layer["qkv_bias"] = jnp.zeros((qkv_out,), dtype)
        if cfg.o_bias:
            layer["o_bias"] = jnp.zeros((d,), dtype)
        layers.append(layer)
    params = {"embed": normal((cfg.vocab_size, d)), "layers": layers, "norm": jnp.ones((d,), dtype)}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = normal((d, cfg.vocab_size))
    else:
        next(keys)
    return params
