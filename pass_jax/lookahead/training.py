"""Look-ahead training as pure functions: many insertion points per sequence in one forward pass.

For a sequence x_0..x_{L-1} and insertion point t, look-ahead i (1-based) sits at RoPE position t + i,
sees x_0..x_t and the block's look-aheads 1..i, and learns to predict x_{t+1+i}: exactly the layout
the decoder uses (`decode.block_layout`). Every block is appended after the real tokens, so one step
trains |points| * k look-aheads (the real tokens run once, without gradient; see `lookahead_loss`).
Only the look-ahead leaf is differentiated: base weights are plain inputs and get no gradient buffers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..backends import resolve
from ..backends.xla import XlaOps
from ..decoding.sampling import top_k
from ..models.cache import KVCache
from ..models.contract import Decoder, params_dtype
from .leaf import split_lookahead

LOSSES = ("ce", "distill", "topc")


@dataclasses.dataclass(frozen=True)
class TrainLayout:
    """Layout for sequences of `seq_len` tokens with a look-ahead block every `stride` tokens.

    per_row=P places each row's P blocks from its first target on (look-ahead 1 of the first block
    predicts it), so no block is spent where every target is prompt; by default every row takes
    `points`, from the sequence's start.
    """

    seq_len: int
    k: int
    stride: int
    per_row: int | None = None

    def __post_init__(self):
        if self.stride < 1 or self.k < 1 or (self.per_row is not None and self.per_row < 1):
            raise ValueError(f"stride, k and points per row must be positive (got stride={self.stride}, k={self.k}, "
                             f"per_row={self.per_row})")
        if len(self.points) == 0:
            raise ValueError(f"seq_len {self.seq_len} leaves no look-ahead insertion point for k={self.k}, "
                             f"stride {self.stride}: raise seq_len or lower stride")

    @property
    def points(self) -> np.ndarray:
        """Insertion points t: the last real token each block sees (its targets must exist)."""
        return np.arange(self.stride - 1, self.seq_len - self.k - 1, self.stride)

    @property
    def num_points(self) -> int:
        return len(self.points) if self.per_row is None else self.per_row

    def row_points(self, target_mask, batch: int):
        """(insertion points [B, P], whether each has its targets in the sequence [B, P]), in-graph."""
        if self.per_row is None:
            t = jnp.broadcast_to(jnp.asarray(self.points, jnp.int32), (batch, len(self.points)))
            return t, jnp.ones(t.shape, bool)
        first = jnp.zeros((batch,), jnp.int32) if target_mask is None else jnp.argmax(target_mask, 1).astype(jnp.int32)
        t = jnp.maximum(first - 2, 0)[:, None] + self.stride * jnp.arange(self.per_row, dtype=jnp.int32)[None]
        last = self.seq_len - self.k - 2  # the last point whose k targets exist
        return jnp.minimum(t, last), t <= last

    def arrays(self):
        """positions [T], mask [T, T], target index [P*k] into the sequence (T = L + P*k)."""
        L, k, pts = self.seq_len, self.k, self.points
        n = len(pts) * k
        t = np.repeat(pts, k)
        i = np.tile(np.arange(1, k + 1), len(pts))
        positions = np.concatenate([np.arange(L), t + i])
        mask = np.zeros((L + n, L + n), bool)
        mask[:L, :L] = np.tril(np.ones((L, L), bool))
        mask[L:, :L] = np.arange(L)[None, :] <= t[:, None]
        block = np.repeat(np.arange(len(pts)), k)
        mask[L:, L:] = (block[:, None] == block[None, :]) & (i[None, :] <= i[:, None])
        return positions.astype(np.int32), mask, (t + 1 + i).astype(np.int32)


def real_pass(params, cfg: Decoder, tokens, ops: XlaOps | None = None) -> tuple[jax.Array, KVCache]:
    """The first of the loss's two passes: the real tokens [B, L], causal, without gradient.

    Returns their final hidden states [B, L, D] and their keys/values, committed. Nothing in it
    depends on the look-ahead, so a run whose rows recur (self-generated data, many epochs) can run
    it once per row and hand it to `lookahead_loss` as `real`. `ops`: as for `model.forward`.
    """
    params = jax.lax.stop_gradient(params)
    b, length = tokens.shape
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (b, length, length))
    hidden, cache = cfg.forward(params, cfg.embed(params, tokens, ops), jnp.broadcast_to(jnp.arange(length), (b, length)),
                            causal, KVCache.create(cfg, b, length, params_dtype(params)), ops=ops)
    return hidden, cache.commit(jnp.full((b,), length))


def lookahead_loss(lookahead, params, cfg: Decoder, tokens, layout: TrainLayout, loss: str = "ce",
                   decay: float = 1.0, target_mask=None, top_c: tuple[int, ...] | None = None, real=None,
                   ops: XlaOps | None = None):
    """Mean loss of the look-ahead predictions over a batch of token sequences [B, L].

    lookahead: [k, D] embeddings or a DeepLookahead (then its prefix is trained too).
    "ce": cross-entropy against the future tokens (on the model's own greedy continuations these are
    exactly what greedy verification accepts); "distill": KL from the base model's own next-token
    distribution at each future position to the look-ahead's; "topc": a smooth hinge that asks only that
    the target rank among look-ahead i's top_c[i] tokens (what a tree with top_c[i] candidates at depth
    i accepts; default 1 each: the chain), softplus(c-th best other logit - target logit) added to the
    cross-entropy, which keeps the rest of the distribution in shape. Look-ahead i is weighted decay**(i-1)
    (deep look-aheads are rarely reached); target_mask [B, L] drops targets that are not the model's
    own tokens (prompts, padding after EOS). real: `real_pass(params, cfg, tokens)`, if already run.

    Two passes: the real tokens run once with no gradient (nothing of theirs depends on the leaf: they
    never attend to a look-ahead), leaving their keys/values in a cache; then only the look-ahead
    blocks run through the decoder, attending to that cache and each to its own block only
    (`forward(local_blocks=k)`), and only they are differentiated. The backward pass is as long as the
    look-ahead blocks, not the sequence, and no block scores the other blocks' keys.
    """
    lookahead, prefix = split_lookahead(lookahead)
    b, length = tokens.shape
    if loss not in LOSSES or length != layout.seq_len or lookahead.shape[0] != layout.k:
        raise ValueError(f"need loss in {LOSSES}, tokens of length {layout.seq_len} and {layout.k} look-aheads "
                         f"(got {loss!r}, {length}, {lookahead.shape[0]})")
    if top_c is not None and len(top_c) != layout.k:
        raise ValueError(f"top_c needs one width per look-ahead ({layout.k}), got {tuple(top_c)}")
    points, real_targets = layout.row_points(target_mask, b)  # [B, P]
    k, n = layout.k, points.shape[1] * layout.k
    t = jnp.repeat(points, k, axis=1)  # [B, n]: look-ahead i of block j at slot j * k + i - 1
    i = jnp.tile(jnp.arange(1, k + 1), n // k)[None]
    target_idx = t + 1 + i
    params = jax.lax.stop_gradient(params)
    hidden, cache = jax.lax.stop_gradient(real_pass(params, cfg, tokens, ops) if real is None else real)
    blocks = jnp.broadcast_to(jnp.tile(lookahead, (n // k, 1)), (b, n, lookahead.shape[1]))
    la_hidden, _ = cfg.forward(params, blocks, t + i, None, cache, visible=jnp.arange(length)[None, None] <= t[..., None],
                           prefix=prefix, prefix_rows=None if prefix is None else jnp.ones((b, n), bool),
                           local_blocks=k, ops=ops)
    logits = cfg.logits(params, la_hidden, ops)  # [B, n, V]
    targets = jnp.take_along_axis(tokens, target_idx, 1)
    if loss in ("ce", "topc"):
        per_target = -target_log_prob(logits, targets)
        if loss == "topc":  # the hinge compares logits of one row: the same on log-probabilities
            per_target = per_target + _top_c_hinge(logits, targets, top_c or (1,) * k)
    else:
        student = jax.nn.log_softmax(logits, -1)
        before = jnp.take_along_axis(hidden, (target_idx - 1)[..., None], 1)  # the base model's state before each target
        teacher = jax.nn.log_softmax(jax.lax.stop_gradient(cfg.logits(params, before, ops)), -1)
        per_target = jnp.sum(jnp.exp(teacher) * (teacher - student), -1)
    weight = jnp.asarray(decay, jnp.float32) ** (i - 1) * jnp.repeat(real_targets, k, axis=1)
    if target_mask is not None:
        weight = weight * jnp.take_along_axis(target_mask, target_idx, 1)
    return jnp.sum(per_target * weight) / jnp.maximum(jnp.sum(weight), 1e-9)


@jax.custom_vjp
def target_log_prob(logits, targets):
    """log softmax(logits)[target] per row: logits [..., V] float32, targets [...] int.

    The value of taking the target from `jax.nn.log_softmax`, with the gradient written out: the
    forward pass keeps exp(logits - max), so the gradient (onehot - softmax) * g is one pass over
    the [rows, V] logits with no exp, where autodiff materialized the log-probabilities and walked
    the vocabulary several times more (on SmolLM2, vocabulary 49152, a head's fused loss and
    gradient of 704 rows took 510 ms against 613 ms, of which 440 ms are its two products).
    """
    return _target_log_prob_fwd(logits, targets)[0]


def _target_log_prob_fwd(logits, targets):
    top = jnp.max(logits, -1, keepdims=True)
    scaled = jnp.exp(logits - top)
    mass = jnp.sum(scaled, -1)
    own = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return own - top[..., 0] - jnp.log(mass), (scaled, mass, targets)


def _target_log_prob_bwd(res, g):
    scaled, mass, targets = res
    onehot = jnp.arange(scaled.shape[-1]) == targets[..., None]
    return g[..., None] * onehot - (g / mass)[..., None] * scaled, np.zeros(targets.shape, jax.dtypes.float0)


target_log_prob.defvjp(_target_log_prob_fwd, _target_log_prob_bwd)


def _top_c_hinge(scores, targets, top_c):
    """softplus(c-th best non-target score - target score) per target: near 0 once the target is in the top c.

    scores [B, n, V] with n = points * k; look-ahead i uses c = top_c[i].
    """
    k = len(top_c)
    if min(top_c) < 1:
        raise ValueError(f"top_c needs positive widths, got {top_c}")
    is_target = jax.nn.one_hot(targets, scores.shape[-1], dtype=bool)
    best = top_k(jnp.where(is_target, -jnp.inf, scores), max(top_c))[0]  # [B, n, max c]
    c = jnp.tile(jnp.asarray(top_c, jnp.int32) - 1, scores.shape[1] // k)
    kth = jnp.take_along_axis(best, jnp.broadcast_to(c[None, :, None], best.shape[:2] + (1,)), -1)[..., 0]
    own = jnp.take_along_axis(scores, targets[..., None], -1)[..., 0]
    return jax.nn.softplus(kth - own)


def make_train_step(cfg: Decoder, layout: TrainLayout, loss: str, tx, replicated=None, decay: float = 1.0,
                    top_c: tuple[int, ...] | None = None, ops: XlaOps | str | None = None):
    """A jitted step(leaf, opt_state, params, tokens, target_mask=None, real=None) -> (leaf, opt_state, loss) on
    the leaf only (real: the batch's `real_pass`, where the caller keeps them).

    `replicated` (a NamedSharding) keeps leaf and optimizer state replicated on a mesh, where GSPMD
    would otherwise split them like the base weights they meet. `ops` (as `make_plan`'s backend) is
    fixed here, once: None or "auto" is `backends.default_ops()`.
    """
    ops = resolve(ops)

    def step(lookahead, opt_state, params, tokens, target_mask=None, real=None):
        value, grad = jax.value_and_grad(lookahead_loss)(lookahead, params, cfg, tokens, layout, loss, decay,
                                                         target_mask, top_c, real, ops)
        updates, opt_state = tx.update(grad, opt_state, lookahead)
        return optax.apply_updates(lookahead, updates), opt_state, value

    return jax.jit(step, donate_argnums=(0, 1), **({} if replicated is None else {"out_shardings": replicated}))
