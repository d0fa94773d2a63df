"""The LLaMA-family decoder as pure functions of (params, cache, inputs, positions).

Params are a plain dict: {"embed": [V, D], "norm": [D], "lm_head": [D, V] (absent when tied),
"layers": [{"attn_norm", "qkv" [D, (H + 2 KV) * hd], "qkv_bias"?, "o", "o_bias"?, "mlp_norm",
"gate_up" [D, 2F], "down"}, ...]}. q/k/v and gate/up are fused so a decode step streams each
layer's weights in as few matrix-vector products as possible. Layers are a Python list, unrolled
under jit: a scan over stacked layers would copy each layer's slice on the CPU backend.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from . import cpu_kernel
from .cache import KVCache, attention_mask, key_positions, write_block
from .config import ModelConfig, rope_inv_freq

Params = dict


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w accumulated in float32 whatever the weight dtype.

    A decode pass's few-row products on one CPU device go through pass-jax's own kernel
    (cpu_kernel.py). Otherwise XLA's dot; there a one-row bfloat16 product takes a slow path on
    the CPU (~1.7x the time of two rows), so a lone row is doubled and the copy dropped.
    """
    if cpu_kernel.applies(x, w):
        return cpu_kernel.dense(x, w)
    x = x.astype(w.dtype)
    if w.dtype == jnp.bfloat16 and math.prod(x.shape[:-1]) == 1 and jax.default_backend() == "cpu":
        flat = x.reshape(1, -1)
        y = jnp.dot(jnp.concatenate([flat, flat]), w, preferred_element_type=jnp.float32)[:1]
        return y.reshape(x.shape[:-1] + (w.shape[-1],))
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


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


def apply_rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotate-half RoPE as in Hugging Face Llama; x [B, T, heads, hd], positions [B, T]."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(cfg))  # [B, T, hd/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def split_qkv(qkv: jax.Array, positions: jax.Array, cfg: ModelConfig):
    """q [B, T, H, hd] and k [B, T, KV, hd] with RoPE applied, and v, from a layer's fused output.

    A decode pass on one CPU device rotates in one kernel call (cpu_kernel.rope): XLA fuses RoPE's
    ops into q's and k's consumers differently for 1-token and many-token passes, so a token's q and
    k came out a bit apart between the two, enough to flip a bfloat16 rounding, then a near-tied
    greedy token."""
    b, t, _ = qkv.shape
    nq, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    heads = qkv.reshape(b, t, nq + 2 * nkv, hd)
    if cpu_kernel.applies_rope(heads):
        heads = cpu_kernel.rope(heads, positions, jnp.asarray(rope_inv_freq(cfg)), nq + nkv)
        return heads[:, :, :nq], heads[:, :, nq:nq + nkv], heads[:, :, nq + nkv:]
    return (apply_rope(heads[:, :, :nq], positions, cfg), apply_rope(heads[:, :, nq:nq + nkv], positions, cfg),
            heads[:, :, nq + nkv:])


def embed_tokens(params: Params, tokens: jax.Array) -> jax.Array:
    """The rows of `tokens`, in float32 (a bfloat16 table's through cpu_kernel.rows on the CPU)."""
    if cpu_kernel.applies_rows(params["embed"]):
        return cpu_kernel.rows(params["embed"], tokens)
    return params["embed"][tokens].astype(jnp.float32)


def _attention(q, keys, values, mask, cfg: ModelConfig, prefix=None, prefix_rows=None, local=None):
    """Grouped-query attention of q [B, T, H, hd] over the whole buffer keys/values [B, S, KV, hd].

    Each KV head's T x groups queries are one block of rows [B, KV, T * groups, hd]. A decode pass on
    one CPU device attends in one kernel call per layer (cpu_kernel.py); otherwise `_attend`'s XLA ops.
    local = (keys, values [B, T, KV, hd], n): the pass's own entries, which are not in the buffer, seen
    in blocks of n slots (training's look-ahead blocks; see `forward`): on one CPU device, forward and
    gradient are one kernel call each (`_block_attention`).
    prefix ([2, P, KV, hd] keys and values, deep look-ahead) is seen by the rows where prefix_rows [B, T]."""
    if local is not None and cpu_kernel.applies_block_attention(q, keys):
        return _block_attention(local[2], q, keys, values, mask, local[0], local[1], prefix, prefix_rows)
    return _attention_xla(q, keys, values, mask, prefix, prefix_rows, local)


def _attention_xla(q, keys, values, mask, prefix=None, prefix_rows=None, local=None):
    b, t, nq, hd = q.shape
    kv, groups = keys.shape[2], nq // keys.shape[2]
    rows = q.reshape(b, t, kv, groups, hd).astype(keys.dtype).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * groups, hd)
    kernel = cpu_kernel.applies_attention(rows, keys, mask)
    if kernel and prefix is not None and local is None and prefix.shape[1] <= cpu_kernel.MAX_PREFIX:  # one softmax
        out = _attend_folded_kernel(rows, keys, values, mask, prefix.astype(keys.dtype), prefix_rows)
        return out.reshape(b, kv, t, groups, hd).transpose(0, 2, 1, 3, 4).reshape(b, t, nq * hd)
    out, top, mass = (_attend_kernel if kernel else _attend)(rows, keys, values, mask)
    seen = None if prefix is None else (prefix.astype(keys.dtype), jnp.repeat(prefix_rows, groups, axis=1))
    if local is not None:  # the prefix joins each block's own keys: one small softmax instead of a fold
        out, top, mass = _merge((out, top, mass), _attend_local(rows, *local, seen))
    elif prefix is not None:
        out = _fold_prefix(rows, top, mass, out, *seen)
    return out.reshape(b, kv, t, groups, hd).transpose(0, 2, 1, 3, 4).reshape(b, t, nq * hd)


def _block_attention(n, q, keys, values, visible, local_k, local_v, prefix, prefix_rows):
    """`_attention_xla` with local blocks of n, by the CPU kernels (cpu_kernel.block_attention)."""
    b, t, nq, hd = q.shape
    if prefix is None:  # P = 0 entries
        prefix = jnp.zeros((2, 0, *keys.shape[2:]), jnp.float32)
    if prefix_rows is None:
        prefix_rows = jnp.ones((b, t), bool)
    return _block_kernel(n, q, keys, values, visible, local_k, local_v, prefix, prefix_rows).reshape(b, t, nq * hd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _block_kernel(n, q, keys, values, visible, local_k, local_v, prefix, prefix_rows):
    return cpu_kernel.block_attention(n, q, keys, values, visible, local_k, local_v, prefix, prefix_rows)[0]


def _block_kernel_fwd(n, *args):
    out, lse = cpu_kernel.block_attention(n, *args)
    return out, (args, out, lse)


def _block_kernel_bwd(n, res, g):
    """The kernel's gradient for queries, block entries and prefix; the cache's through XLA's ops, which
    XLA drops where the cache is a constant (training: the real tokens' pass has no gradient)."""
    args, out, lse = res
    q, keys, values, visible, local_k, local_v, prefix, prefix_rows = args
    dq, d_local_k, d_local_v, d_prefix = cpu_kernel.block_attention_grad(n, *args, out, lse, g)
    _, vjp = jax.vjp(lambda k, v: _attention_xla(q, k, v, visible, prefix if prefix.shape[1] else None, prefix_rows,
                                                 (local_k, local_v, n)).reshape(out.shape), keys, values)
    d_keys, d_values = vjp(g)
    cast = lambda d, x: d.astype(x.dtype)
    return (cast(dq, q), d_keys, d_values, None, cast(d_local_k, local_k), cast(d_local_v, local_v),
            cast(d_prefix, prefix), None)


_block_kernel.defvjp(_block_kernel_fwd, _block_kernel_bwd)


def _attend(rows, keys, values, mask):
    """rows [B, KV, R, hd] over keys/values [B, S, KV, hd] where mask [B, T, S] (R = T x groups, rows
    ordered (t, group)) as XLA ops: two batched products over [B, KV] (1.5-1.8x faster on the CPU than
    batching over [B, KV, groups] in bfloat16). Returns out [B, KV, R, hd] float32 and, per row, the
    max score and sum of exp(score - max) over the softmax."""
    hd, groups = rows.shape[-1], rows.shape[2] // mask.shape[1]
    keys_t, values_t = keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)  # [B, KV, S, hd]
    scores = jnp.einsum("bkrd,bksd->bkrs", rows, keys_t, preferred_element_type=jnp.float32) * (hd ** -0.5)
    scores = jnp.where(jnp.repeat(mask, groups, axis=1)[:, None], scores, -1e30)
    top = scores.max(-1)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkrs,bksd->bkrd", probs.astype(values.dtype), values_t, preferred_element_type=jnp.float32)
    return out, top, jnp.sum(jnp.exp(scores - top[..., None]), -1)


def _attend_local(rows, keys, values, n: int, prefix=None):
    """rows [B, KV, T * groups, hd] over the pass's own keys/values [B, T, KV, hd], cut into blocks of n
    slots: a row sees the slots of its block up to its own, and, given prefix = (keys/values [2, P, KV,
    hd], seen [B, R]), the P prefix entries where seen. Returns (out, top, mass) as `_attend` does."""
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


def _merge(a, b):
    """One softmax over two disjoint key sets, from each set's (out, max score, mass)."""
    (out_a, top_a, mass_a), (out_b, top_b, mass_b) = a, b
    top = jnp.maximum(top_a, top_b)
    wa, wb = mass_a * jnp.exp(top_a - top), mass_b * jnp.exp(top_b - top)
    return (wa[..., None] * out_a + wb[..., None] * out_b) / (wa + wb)[..., None], top, wa + wb


@jax.custom_vjp
def _attend_kernel(rows, keys, values, mask):
    return cpu_kernel.attention(rows, keys, values, mask)


def _attend_kernel_fwd(rows, keys, values, mask):
    return _attend_kernel(rows, keys, values, mask), (rows, keys, values, mask)


def _attend_kernel_bwd(res, g):  # through XLA's ops: gradients only flow in training
    rows, keys, values, mask = res
    _, vjp = jax.vjp(lambda r, k, v: _attend(r, k, v, mask), rows, keys, values)
    return (*vjp(g), None)


_attend_kernel.defvjp(_attend_kernel_fwd, _attend_kernel_bwd)


@jax.custom_vjp
def _attend_folded_kernel(rows, keys, values, mask, prefix, prefix_rows):
    """`_attend` then `_fold_prefix` as one kernel call (decode passes with a deep look-ahead)."""
    return cpu_kernel.attention(rows, keys, values, mask, prefix, prefix_rows)[0]


def _attend_folded_xla(rows, keys, values, mask, prefix, prefix_rows):
    out, top, mass = _attend(rows, keys, values, mask)
    return _fold_prefix(rows, top, mass, out, prefix, jnp.repeat(prefix_rows, rows.shape[2] // mask.shape[1], axis=1))


def _attend_folded_fwd(*args):
    return _attend_folded_kernel(*args), args


def _attend_folded_bwd(res, g):  # through XLA's ops, as `_attend_kernel`'s
    rows, keys, values, mask, prefix, prefix_rows = res
    _, vjp = jax.vjp(lambda r, k, v, p: _attend_folded_xla(r, k, v, mask, p, prefix_rows), rows, keys, values, prefix)
    dr, dk, dv, dp = vjp(g)
    return dr, dk, dv, None, dp, None


_attend_folded_kernel.defvjp(_attend_folded_fwd, _attend_folded_bwd)


def _fold_prefix(rows, top, mass, out, prefix, seen):
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
            prefix_rows: jax.Array | None = None, local_blocks: int | None = None) -> tuple[jax.Array, KVCache]:
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
    mask = attention_mask(cache.lengths, block_mask, cache.max_len) if visible is None else visible
    if cfg.sliding_window is not None:
        kpos = key_positions(cache.lengths, positions, cache.max_len)
        mask &= (positions[:, :, None] - kpos[:, None, :]) < cfg.sliding_window
    x = embeds.astype(jnp.float32)
    keys, values = list(cache.keys), list(cache.values)
    for i, layer in enumerate(params["layers"]):
        qkv = dense(rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps), layer["qkv"])
        if "qkv_bias" in layer:
            qkv = qkv + layer["qkv_bias"].astype(jnp.float32)
        q, k, v = split_qkv(qkv, positions, cfg)
        local = None
        if local_blocks is None:
            keys[i] = write_block(keys[i], k, cache.lengths)
            values[i] = write_block(values[i], v, cache.lengths)
        else:
            local = (k, v, local_blocks)
        attn = dense(_attention(q, keys[i], values[i], mask, cfg, None if prefix is None else prefix[i], prefix_rows,
                                local), layer["o"])
        x = x + (attn + layer["o_bias"].astype(jnp.float32) if "o_bias" in layer else attn)
        x = x + dense(swiglu(dense(rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps), layer["gate_up"])), layer["down"])
    hidden = rms_norm(x, params["norm"], cfg.rms_norm_eps)
    return hidden, cache.replace(keys=tuple(keys), values=tuple(values))


def logits_from_hidden(params: Params, hidden: jax.Array) -> jax.Array:
    """float32 logits; a tied head reuses the embedding matrix."""
    if "lm_head" in params:
        return dense(hidden, params["lm_head"])
    w = params["embed"]
    if cpu_kernel.applies(hidden, w):
        return cpu_kernel.dense(hidden, w, transposed=True)
    return jnp.einsum("...d,vd->...v", hidden.astype(w.dtype), w, preferred_element_type=jnp.float32)


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
