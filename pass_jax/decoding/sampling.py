"""Token distributions and the speculative accept/reject rule, shared by every decoding method.

Randomness is indexed by (row, output position): the token at output index n of row b draws from
`position_keys(row_key[b], n)`, so a row's output never depends on the rest of its batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampler:
    """temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: jax.Array) -> jax.Array:
        """float32 probabilities after temperature, top-k and top-p (the same for target and draft)."""
        logits = logits.astype(jnp.float32) / self.temperature
        top = None
        if self.top_k and self.top_k < logits.shape[-1]:
            top = top_k(logits, self.top_k)[0]
            logits = jnp.where(logits < top[..., -1:], -jnp.inf, logits)
        probs = jax.nn.softmax(logits, axis=-1)
        if self.top_p < 1.0:
            if top is None:
                sorted_p = jnp.sort(probs, axis=-1)[..., ::-1]
                before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly above each entry
                cutoff = jnp.min(jnp.where(before < self.top_p, sorted_p, jnp.inf), axis=-1, keepdims=True)
                probs = jnp.where(probs >= cutoff, probs, 0.0)
            else:  # the nucleus lies within the top k: sort those alone, cut on logits (ties share a fate)
                sorted_p = jnp.exp(top - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
                before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
                cutoff = jnp.min(jnp.where(before < self.top_p, top, jnp.inf), axis=-1, keepdims=True)
                probs = jnp.where(logits >= cutoff, probs, 0.0)
            probs = probs / probs.sum(-1, keepdims=True)
        return probs


def top_k(x: jax.Array, k: int, chunk: int = 32) -> tuple[jax.Array, jax.Array]:
    """(values, indices) of the k largest entries of the last axis, like lax.top_k (duplicates counted).

    lax.top_k over a whole vocabulary is ~100 ms on the CPU; the k largest entries lie in the k
    chunks with the largest maxima, so two small top_k calls find them in ~0.3 ms.
    """
    v = x.shape[-1]
    if v <= 4 * chunk or k * chunk >= v:
        return jax.lax.top_k(x, k)
    xc = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -v % chunk)], constant_values=-jnp.inf)
    xc = xc.reshape(x.shape[:-1] + (-1, chunk))
    best = jnp.sort(jax.lax.top_k(xc.max(-1), k)[1], axis=-1)  # chunk order keeps lax.top_k's tie order
    values, pos = jax.lax.top_k(jnp.take_along_axis(xc, best[..., None], -2).reshape(x.shape[:-1] + (-1,)), k)
    return values, jnp.take_along_axis(best, pos // chunk, -1) * chunk + pos % chunk


# the three keys of one (row, output position): draw a draft, accept or reject it, emit the token
DRAFT, ACCEPT, EMIT = 0, 1, 2


def position_keys(row_keys: jax.Array, index: jax.Array) -> jax.Array:
    """Per-row keys for output index `index` ([B] or [B, n]): [..., 3, 2], indexed by DRAFT, ACCEPT, EMIT."""
    fold = jax.vmap(jax.random.fold_in)
    if index.ndim == 1:
        return jax.vmap(lambda k: jax.random.split(k, 3))(fold(row_keys, index))
    return jax.vmap(lambda k, i: jax.vmap(lambda j: jax.random.split(jax.random.fold_in(k, j), 3))(i))(row_keys, index)


def sample(probs: jax.Array, keys: jax.Array) -> jax.Array:
    """One token per leading index from float32 probs [..., V] with matching keys [..., 2].

    Inverse CDF with one uniform per draw: a Gumbel draw per vocabulary entry costs ~5x more on
    the CPU, and every tree node draws. The token is the first whose cumulative mass exceeds u.
    """
    v = probs.shape[-1]
    flat_p, flat_k = probs.reshape(-1, v), keys.reshape(-1, keys.shape[-1])
    cdf = jnp.cumsum(flat_p, axis=-1)
    u = jax.vmap(jax.random.uniform)(flat_k) * cdf[:, -1]
    last = v - 1 - jnp.argmax(flat_p[:, ::-1] > 0, axis=-1)  # u * total may round up to the total
    toks = jnp.minimum(jnp.sum(cdf <= u[:, None], axis=-1), last)
    return toks.reshape(probs.shape[:-1]).astype(jnp.int32)


def verify(logits: jax.Array, drafts: jax.Array, draft_probs: jax.Array, n_drafts: jax.Array,
           sampler: Sampler, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Speculative verification of each row's first n_drafts drafts.

    logits [B, n+1, V]: target logits at the pending token and after each draft;
    drafts [B, n]; draft_probs [B, n, V] the distributions they were sampled from (unused if greedy);
    keys [B, n+1, 3, 2] position keys of the draft positions and the one after.
    Returns (accepted count a [B], next token [B]): the row emits drafts[:a] then next.
    """
    n = drafts.shape[1]
    if n == 0:  # nothing to verify: one exact token
        if sampler.greedy:
            return jnp.zeros(logits.shape[:1], jnp.int32), jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
        return jnp.zeros(logits.shape[:1], jnp.int32), sample(sampler.probs(logits[:, 0]), keys[:, 0, EMIT])
    live = jnp.arange(n)[None, :] < n_drafts[:, None]
    if sampler.greedy:
        target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, n+1]
        accept = (drafts == target[:, :n]) & live
        a = jnp.sum(jnp.cumprod(accept, axis=1), axis=1)
        return a, jnp.take_along_axis(target, a[:, None], 1)[:, 0]
    p = sampler.probs(logits)  # [B, n+1, V]
    p_d = jnp.take_along_axis(p[:, :n], drafts[..., None], 2)[..., 0]
    q_d = jnp.take_along_axis(draft_probs, drafts[..., None], 2)[..., 0]
    u = jax.vmap(jax.vmap(lambda k: jax.random.uniform(k)))(keys[:, :n, ACCEPT])
    accept = (u * q_d < p_d) & live
    a = jnp.sum(jnp.cumprod(accept, axis=1), axis=1)
    p_a = jnp.take_along_axis(p, a[:, None, None], 1)[:, 0]
    q_pad = jnp.concatenate([draft_probs, jnp.zeros_like(p[:, :1])], axis=1)
    q_a = jnp.take_along_axis(q_pad, a[:, None, None], 1)[:, 0]
    rejected = (a < n_drafts)[:, None]
    residual = jnp.where(rejected, jnp.maximum(p_a - q_a, 0.0), p_a)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p_a)
    emit_keys = jnp.take_along_axis(keys[:, :, EMIT], a[:, None, None], 1)[:, 0]
    return a, sample(residual / residual.sum(-1, keepdims=True), emit_keys)


def verify_tree(logits: jax.Array, tokens: jax.Array, valid: jax.Array, parents, ancestors, sampler: Sampler,
                keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The longest accepted path through a tree of deterministic candidates (top-c, n-gram).

    logits [B, N, V] at every node; tokens / valid [B, N] the candidates (node 0, the root, is the
    pending token); parents [N] and ancestors [N, N] the static shape; keys [B, N, 2] the emit key
    of the output position each node's successor fills (the key autoregressive decoding uses there).
    At each node the model's own token is drawn (argmax, or a sample from the exact distribution);
    a child is accepted when it equals its parent's draw. With point-mass drafts this is recursive
    rejection over siblings (SpecInfer): sibling c_i survives with probability
    p(c_i) / (1 - p(c_1) - ... - p(c_{i-1})), the chance that a draw from p is c_i given it is none
    of the earlier ones, and the renormalized residual after all rejections is the draw itself.
    So the output has the model's distribution, and equals autoregressive sampling token for token
    for the same keys. Returns (end node [B]: the deepest accepted node, draws [B, N]).
    """
    if sampler.greedy:
        draws = jnp.argmax(logits, -1).astype(jnp.int32)
    else:
        draws = sample(sampler.probs(logits), keys)
    accepted = valid & (tokens == draws[:, parents])
    accepted = accepted.at[:, 0].set(True)
    on_path = ~jnp.any(jnp.asarray(ancestors)[None] & ~accepted[:, None, :], -1)  # every ancestor accepted
    depth = jnp.sum(jnp.asarray(ancestors), -1) - 1
    return jnp.argmax(jnp.where(on_path, depth[None], -1), 1).astype(jnp.int32), draws
