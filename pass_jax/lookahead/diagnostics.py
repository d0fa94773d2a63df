"""Look-ahead diagnostics: what each look-ahead predicts, measured directly instead of through decoding.

Along a greedy continuation x_0..x_{L-1} of a prompt, at every insertion point t (the last token a
look-ahead block sees, the layout of `decode.block_layout` and `training.TrainLayout`), look-ahead i
drafts the token at t+1+i, and greedy verification accepts it iff it is the model's own argmax there.
We record the rank of that greedy token in each look-ahead's logits (0 = its argmax), so top-c
agreement is `rank < c`, and the joint ranks give the tokens per forward of chain and tree drafting.

The ceiling: a drafter that sees only x_<=t and matches the model's distribution (what distillation
aims for) predicts argmax p(x_{t+1+i} | x_<=t), the model's distribution marginalized over the
intermediate tokens. We enumerate a top-`beam` beam of intermediate paths (weights: products of the
model's probabilities; the rest of the mass is dropped) and count how often that argmax is the greedy
token. Each depth costs one extra pass of `beam` branches per point, hence small depths. A drafter
trained on greedy targets (CE on greedy self-data) is not bound by it: the greedy token is a function
of x_<=t, only a hard one to compute in one pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..decoding.tree import DraftTree
from ..models.cache import KVCache
from ..models.contract import Decoder, params_dtype
from .leaf import split_lookahead

TOPS = (1, 5, 10)


def branch_layout(length: int, roots: jax.Array, depth: int):
    """Positions [B, T] and mask [B, T, T] for x_0..x_{length-1} followed by one branch per root.

    roots [B, N]: branch n has `depth` slots at positions t+1..t+depth (t = roots[:, n]); a slot sees
    x_0..x_t and its branch's earlier slots, as a look-ahead block after x_t does in the decoder, or a
    path of candidate tokens in a tree pass. Real tokens are causal and see no branch. T = length + N * depth.
    """
    b, n = roots.shape
    t = jnp.repeat(roots, depth, axis=1)  # [B, N*depth] root of each slot
    d = jnp.tile(jnp.arange(1, depth + 1), n)  # [N*depth] depth of each slot
    branch = jnp.repeat(jnp.arange(n), depth)
    s = jnp.arange(length)
    positions = jnp.concatenate([jnp.broadcast_to(s, (b, length)), t + d], 1)
    own = (branch[:, None] == branch[None, :]) & (d[None, :] <= d[:, None])
    top = jnp.concatenate([jnp.broadcast_to(s[None, :] <= s[:, None], (b, length, length)),
                           jnp.zeros((b, length, n * depth), bool)], 2)
    bottom = jnp.concatenate([s[None, None, :] <= t[:, :, None], jnp.broadcast_to(own, (b, n * depth, n * depth))], 2)
    return positions.astype(jnp.int32), jnp.concatenate([top, bottom], 1)


def _branch_hidden(params, cfg: Decoder, tokens, roots, branch_embeds, depth: int, prefix=None):
    """Final hidden states of the real tokens [B, L, D] and of the branch slots [B, N*depth, D], in one pass
    (branch slots see a deep look-ahead's prefix when one is given)."""
    b, length = tokens.shape
    positions, mask = branch_layout(length, roots, depth)
    embeds = jnp.concatenate([cfg.embed(params, tokens), branch_embeds.astype(jnp.float32)], 1)
    cache = KVCache.create(cfg, b, embeds.shape[1], params_dtype(params))
    rows = None if prefix is None else jnp.broadcast_to(jnp.arange(embeds.shape[1]) >= length, embeds.shape[:2])
    hidden, _ = cfg.forward(params, embeds, positions, mask, cache, prefix=prefix, prefix_rows=rows)
    return hidden[:, :length], hidden[:, length:]


@functools.partial(jax.jit, static_argnames=("cfg", "n_points", "ceiling_depth", "beam"))
def diagnose(params, cfg: Decoder, lookahead, tokens, first, lengths, *, n_points: int,
             ceiling_depth: int = 2, beam: int = 8) -> dict:
    """Ranks and ceiling hits at insertion points t = first + j, j < n_points, for a batch of sequences.

    tokens [B, L] padded, first [B] the first insertion point (a prompt's last token), lengths [B].
    The target of depth i is the model's argmax at t+i (the next token, on a greedy continuation).
    Returns ranks [B, N, k] of the targets in the look-ahead logits, valid [B, N, k] (t+1+i < length),
    ceiling [B, N, ceiling_depth] (the beam-marginal's argmax is the target) and ceiling_valid.
    """
    b, length = tokens.shape
    lookahead, prefix = split_lookahead(lookahead)
    k, dim = lookahead.shape
    points = first[:, None] + jnp.arange(n_points)[None]  # [B, N]
    roots = jnp.minimum(points, length - 1)

    def valid(depth):  # [B, N, depth]
        return points[..., None] + 1 + jnp.arange(1, depth + 1) < lengths[:, None, None]

    la = jnp.broadcast_to(jnp.tile(lookahead, (n_points, 1)), (b, n_points * k, dim))
    real_h, la_h = _branch_hidden(params, cfg, tokens, roots, la, k, prefix)
    real_logp = jax.nn.log_softmax(cfg.logits(params, real_h), -1)  # [B, L, V]
    greedy = jnp.argmax(real_logp, -1)  # greedy[:, s]: the model's token at s+1

    def target(i):  # [B, N] greedy token at t+1+i
        return jnp.take_along_axis(greedy, jnp.minimum(roots + i, length - 1), 1)

    targets = jnp.stack([target(i) for i in range(1, k + 1)], -1)  # [B, N, k]
    la_logits = cfg.logits(params, la_h).reshape(b, n_points, k, -1)
    ranks = jnp.sum(la_logits > jnp.take_along_axis(la_logits, targets[..., None], -1), -1)

    # Ceiling: beam over intermediate paths x_{t+1..t+d}; paths [B, N, beam, d], score = log product of probs.
    hits = []
    score, paths = jax.lax.top_k(jnp.take_along_axis(real_logp, roots[..., None], 1), beam)
    paths = paths[..., None]
    for d in range(1, ceiling_depth + 1):
        emb = cfg.embed(params, paths.reshape(b, n_points * beam * d))
        _, h = _branch_hidden(params, cfg, tokens, jnp.repeat(roots, beam, 1), emb, d)
        last = h.reshape(b, n_points, beam, d, -1)[:, :, :, -1]
        joint = score[..., None] + jax.nn.log_softmax(cfg.logits(params, last), -1)  # [B, N, beam, V]
        hits.append(jnp.argmax(jax.nn.logsumexp(joint, 2), -1) == target(d))
        if d < ceiling_depth:  # extend the beam by one token
            score, idx = jax.lax.top_k(joint.reshape(b, n_points, -1), beam)
            vocab = joint.shape[-1]
            parent = jnp.broadcast_to((idx // vocab)[..., None], paths.shape)
            paths = jnp.concatenate([jnp.take_along_axis(paths, parent, 2), (idx % vocab)[..., None]], -1)
    ceiling = jnp.stack(hits, -1) if hits else jnp.zeros((b, n_points, 0), bool)
    return {"ranks": ranks, "valid": valid(k), "ceiling": ceiling, "ceiling_valid": valid(ceiling_depth)}


def tree_widths(tree: DraftTree | str) -> tuple[int, ...]:
    """The look-ahead widths of a spine-with-ribs tree (DraftTree.from_widths); n-gram candidates are ignored."""
    tree = DraftTree.parse(tree) if isinstance(tree, str) else tree
    widths = tuple(sum(1 for p in tree.paths if len(p) == d) for d in range(1, tree.la_depth + 1))
    if set(DraftTree.from_widths(widths).paths) != set(tree.paths):
        raise ValueError(f"tree {tree.describe()!r} is not a spine with ribs: only those are estimated")
    return widths


def _flat(a) -> np.ndarray:
    """[..., n] -> [rows * points, n] (numpy cannot infer -1 when n is 0)."""
    a = np.asarray(a)
    return a.reshape(int(np.prod(a.shape[:-1])), a.shape[-1])


def expected_tokens(ranks: np.ndarray, valid: np.ndarray, widths) -> dict:
    """Tokens per forward of a tree round (one pass per round, a block on every node): 1 + accepted depth.

    Depth i is accepted when the greedy token is among look-ahead i's top widths[i] and depths < i were
    accepted on the spine (rank 0; the ribs have no children). A chain is widths (1, ..., 1).
    "independent": 1 + sum_i prod_{j<i} top1_j * top{w_i}_i, assuming acceptances independent across
    depths; "joint": the same counted point by point (no independence assumed; points with every depth valid).
    """
    r, v = _flat(ranks), _flat(valid)
    w = np.asarray(widths)
    m = len(w)
    if not 1 <= m <= r.shape[1]:
        raise ValueError(f"tree depth {m} must be in 1..k={r.shape[1]}")

    def rate(i, c):
        return float(np.mean(r[v[:, i], i] < c)) if v[:, i].any() else 0.0

    independent, spine = 1.0, 1.0
    for i in range(m):
        independent += spine * rate(i, w[i])
        spine *= rate(i, 1)
    full = v[:, :m].all(1)
    hit, on_spine = r[full, :m] < w, r[full, :m] == 0
    reach = np.concatenate([np.ones((hit.shape[0], 1), bool), np.cumprod(on_spine, 1)[:, :-1].astype(bool)], 1)
    joint = float(np.mean(1 + (hit & reach).sum(1))) if full.any() else None
    return {"widths": [int(x) for x in w], "independent": independent, "joint": joint}


def summarize(out: dict, tops=TOPS, widths=None) -> dict:
    """Per look-ahead position: top-c agreement, point counts, ceiling; chain and tree tokens per forward."""
    r, v = np.asarray(out["ranks"]), np.asarray(out["valid"])
    k = r.shape[-1]
    r2, v2 = _flat(r), _flat(v)
    res = {"k": k, "points": v2.sum(0).tolist()}
    for c in tops:
        res[f"top{c}"] = [float(np.mean(r2[v2[:, i], i] < c)) if v2[:, i].any() else None for i in range(k)]
    ch, cv = _flat(out["ceiling"]), _flat(out["ceiling_valid"])
    res["ceiling"] = [float(np.mean(ch[cv[:, i], i])) if cv[:, i].any() else None for i in range(ch.shape[1])]
    res["chain"] = expected_tokens(r, v, (1,) * k)
    if widths:
        res["tree"] = expected_tokens(r, v, widths[:k])
    return res


def evaluate(params, cfg: Decoder, lookahead, prompts, continuations, *, widths=None, ceiling_depth: int = 2,
             beam: int = 8, batch_size: int = 4, progress=None) -> dict:
    """`summarize` over prompts (token id lists) and the model's greedy continuations of them.

    Rows are padded to one shape (and the batch to `batch_size` with empty rows) so one compile serves all;
    `progress(n)` is called after each batch of n rows.
    """
    seqs = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    n_points = max(len(c) for c in continuations) - 1
    if n_points < 1:
        raise ValueError("continuations need at least 2 tokens to score a look-ahead")
    length = -(-max(map(len, seqs)) // 16) * 16
    beam = min(beam, cfg.vocab_size)
    parts = []
    for s in range(0, len(seqs), batch_size):
        rows = seqs[s:s + batch_size]
        tokens = np.zeros((batch_size, length), np.int32)
        first, lengths = np.zeros(batch_size, np.int32), np.zeros(batch_size, np.int32)
        for j, (row, p) in enumerate(zip(rows, prompts[s:s + batch_size])):
            tokens[j, :len(row)], first[j], lengths[j] = row, len(p) - 1, len(row)
        out = diagnose(params, cfg, lookahead, jnp.asarray(tokens), jnp.asarray(first), jnp.asarray(lengths),
                       n_points=n_points, ceiling_depth=ceiling_depth, beam=beam)
        parts.append(jax.tree.map(np.asarray, out))
        if progress is not None:
            progress(len(rows))
    return summarize(jax.tree.map(lambda *a: np.concatenate(a), *parts), widths=widths)
