"""Autoregressive and PaSS decoding: one `lax.while_loop` each, batched, with per-row lengths.

Every method is built from one step, `_round`: run [pending token, drafts?, look-ahead block?]
through the model, verify the drafts (none for autoregressive decoding), emit the accepted drafts
plus one exact token, commit that many cache entries, and take new drafts from the look-ahead
outputs. Autoregressive = round(no drafts, no look-ahead); PaSS paper = alternating validation
rounds (drafts only) and drafting rounds (look-ahead only; the prefill is the first); PaSS fused =
drafts and look-ahead in one round, the look-ahead drafts being valid only where every draft was
accepted; two-model speculative = a draft model's k proposals, then a validation round.

Tree methods use `_tree_round` instead: [pending token, candidate nodes, a look-ahead block per
node] in one pass, candidates from the look-ahead outputs (top-c per position) and from context
n-grams; the accepted path is moved to the front of the cache block, and the block of the deepest
accepted node that has one drafts the next round, so with a block on every node there are no
draft-less rounds (with fewer blocks, a path that runs k or more tokens past its block has none). "ngram" is
the same round with n-gram candidates only (prompt lookup) and no look-ahead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from ..backends import resolve
from ..backends.xla import XlaOps
from ..lookahead.leaf import split_lookahead
from ..models.cache import KVCache, write_block
from ..models.contract import Decoder, causal_block_mask, params_dtype
from ..sharding import constrain_cache
from .ngram import prompt_lookup, row_history
from .sampling import DRAFT, EMIT, Sampler, position_keys, sample, top_k, verify, verify_tree
from .tree import DraftTree


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """What to generate and how: static (part of the jit cache key)."""

    method: str = "ar"  # a key of DRAFT_METHODS, with variant for "pass"
    k: int = 0
    variant: str = "tree"
    sampler: Sampler = dataclasses.field(default_factory=Sampler)
    max_new_tokens: int = 32
    eos_ids: tuple[int, ...] = ()
    tree: DraftTree | None = None  # the candidate tree of the tree rounds ("ngram", "pass"/"tree")

    @property
    def draft(self) -> DraftMethod:
        return DRAFT_METHODS[self.method if self.method != "pass" else f"pass/{self.variant}"]

    @property
    def is_tree(self) -> bool:
        return self.draft.tree

    @property
    def max_drafts(self) -> int:
        """Longest run of drafts one round can accept (the size of the acceptance statistics)."""
        return self.tree.max_depth if self.is_tree else self.k

    @property
    def block_tokens(self) -> int:
        """Largest block a round writes into the cache beyond the committed entries."""
        return self.draft.block_tokens(self)


@struct.dataclass
class DecodeState:
    cache: KVCache
    pending: jax.Array  # [B] last emitted token, not yet in the cache
    drafts: jax.Array  # [B, k] drafts for the output positions after `pending`
    draft_probs: jax.Array  # [B, k, V] the distributions they were drawn from ([B, k, 1] when greedy)
    n_drafts: jax.Array  # [B] how many drafts are valid (0 or k)
    out: jax.Array  # [B, W] emitted tokens
    out_len: jax.Array  # [B]
    done: jax.Array  # [B] bool
    row_passes: jax.Array  # [B] forward passes while the row was live
    calls: jax.Array  # scalar: batched forward passes
    accepted: jax.Array  # [max_drafts] rounds in which drafts 1..j+1 were all accepted
    draft_rounds: jax.Array  # scalar: (row, round) pairs that verified drafts
    draft_cache: KVCache | None = None  # the draft model's cache (two-model speculative sampling only)
    top_candidates: jax.Array | None = None  # [B, k, C] tree methods: best C tokens of each look-ahead output
    node_hits: jax.Array | None = None  # [N] tree methods: (row, round) pairs whose accepted path held node i
    ngram_rows: jax.Array | None = None  # scalar, trees with an n-gram chain: (row, round) pairs that drafted one


@struct.dataclass
class Inputs:
    """The traced inputs of one generation call, handed to every round."""

    params: dict
    lookahead: jax.Array  # [k, D] ([0, D] for methods without look-ahead)
    prompts: jax.Array  # [B, Tp] padded
    prompt_lens: jax.Array  # [B]
    row_keys: jax.Array  # [B, 2] raw per-row keys: randomness is indexed by (row, output position)
    draft_params: dict | None = None  # two-model speculative sampling only
    prefix: jax.Array | None = None  # deep look-ahead: [layers, 2, P, KV, hd] keys/values only look-aheads see


def _forward(plan: DecodePlan, inp: Inputs, embeds, positions, mask, cache, n_real: int, ops: XlaOps, visible=None):
    """The decoder over a block whose slots from n_real on are look-aheads (they alone see a deep prefix).

    Positions are clipped to the plan's last one: a draft block may reach past it near the end of a
    request, but only tokens inside it are ever emitted (drafts past the budget are never accepted)."""
    if plan.max_position is not None:
        positions = jnp.minimum(positions, plan.max_position)
    if inp.prefix is None or n_real >= embeds.shape[1]:  # no look-ahead rows: autoregressive decoding's graph
        return plan.cfg.forward(inp.params, embeds, positions, mask, cache, visible=visible, ops=ops)
    rows = jnp.broadcast_to(jnp.arange(embeds.shape[1]) >= n_real, embeds.shape[:2])
    return plan.cfg.forward(inp.params, embeds, positions, mask, cache, visible=visible, prefix=inp.prefix,
                   prefix_rows=rows, ops=ops)


def block_layout(lengths, last_token, n_tok: int, n_la: int):
    """Positions [B, T] and block mask [B, T, T] for [tokens (n_tok), look-ahead (n_la)].

    Token slots are causal. Look-ahead slot i sits right after the last valid token slot
    (slot last_token[b]) and sees token slots 0..last_token and look-ahead slots 0..i.
    """
    t = n_tok + n_la
    s = jnp.arange(t)
    is_la = s >= n_tok
    causal = s[None, :] <= s[:, None]
    token_key_ok = s[None, None, :] <= last_token[:, None, None]
    mask = causal[None] & (~is_la[None, :, None] | is_la[None, None, :] | token_key_ok)
    offset = jnp.where(is_la[None], last_token[:, None] + 1 + (s - n_tok)[None], s[None])
    return lengths[:, None] + offset, mask


def _drafts_from_logits(logits, spec: DecodeSpec, row_keys, first_index):
    """Drafts (and the distributions they were drawn from) for output indices first_index + i."""
    if spec.sampler.greedy:
        drafts = jnp.argmax(logits, -1).astype(jnp.int32)
        return drafts, jnp.zeros(drafts.shape + (1,), jnp.float32)
    q = spec.sampler.probs(logits)
    idx = first_index[:, None] + jnp.arange(logits.shape[1])[None]
    return sample(q, position_keys(row_keys, idx)[:, :, DRAFT]), q


def _emit(state: DecodeState, spec: DecodeSpec, emitted, n_emit, pending, commit=None, passes=1):
    """Append tokens, stop rows at EOS or budget, commit cache entries (default: one per emitted
    token, the pending one's entry being written by the next pass); done rows are left untouched."""
    live = ~state.done
    n_emit = jnp.minimum(n_emit, spec.max_new_tokens - state.out_len)
    slot = jnp.arange(emitted.shape[1])[None]
    is_eos = jnp.isin(emitted, jnp.asarray(spec.eos_ids or (-1,))) & (slot < n_emit[:, None])
    hit = is_eos.any(1)
    n_emit = jnp.where(hit, jnp.argmax(is_eos, 1) + 1, n_emit)
    out_len = state.out_len + jnp.where(live, n_emit, 0)
    commit = n_emit if commit is None else commit
    return state.replace(
        out=write_block(state.out, emitted, state.out_len),  # past out_len is scratch, trimmed at the end
        out_len=out_len,
        done=state.done | hit | (out_len >= spec.max_new_tokens),
        cache=state.cache.commit(jnp.where(live, commit, 0)),
        pending=jnp.where(live, pending, state.pending),
        row_passes=state.row_passes + passes * live,
        calls=state.calls + passes,
    )


def _round(plan: DecodePlan, inp: Inputs, state: DecodeState, use_drafts: bool, use_la: bool) -> DecodeState:
    """One chain round: [pending token, drafts?, look-ahead block?]; verify, emit, take new drafts."""
    params, cfg, spec, lookahead, row_keys, ops = inp.params, plan.cfg, plan.spec, inp.lookahead, inp.row_keys, plan.round_ops
    b, k = state.pending.shape[0], spec.k
    n_drafts = state.n_drafts if use_drafts else jnp.zeros_like(state.n_drafts)
    drafts = state.drafts if use_drafts else state.drafts[:, :0]
    embeds = cfg.embed(params, jnp.concatenate([state.pending[:, None], drafts], 1), ops)
    n_tok = embeds.shape[1]
    if use_la:
        embeds = jnp.concatenate([embeds, jnp.broadcast_to(lookahead.astype(jnp.float32), (b,) + lookahead.shape)], 1)
    positions, mask = block_layout(state.cache.lengths, n_drafts, n_tok, k if use_la else 0)
    hidden, cache = _forward(plan, inp, embeds, positions, mask, state.cache, n_tok, ops)
    logits = cfg.logits(params, hidden, ops)
    keys = position_keys(row_keys, state.out_len[:, None] + jnp.arange(n_tok)[None])
    probs = state.draft_probs if use_drafts else state.draft_probs[:, :0]
    a, nxt = verify(logits[:, :n_tok], drafts, probs, n_drafts, spec.sampler, keys)
    emitted = jnp.where(jnp.arange(n_tok)[None] == a[:, None], nxt[:, None],
                        jnp.concatenate([drafts, nxt[:, None]], 1))
    with_drafts = (n_drafts > 0) & ~state.done
    state = state.replace(
        cache=cache,
        accepted=state.accepted + jnp.sum((a[:, None] > jnp.arange(k)[None]) & with_drafts[:, None], 0),
        draft_rounds=state.draft_rounds + with_drafts.sum(),
    )
    if use_la:
        new, q = _drafts_from_logits(logits[:, n_tok:], spec, row_keys, state.out_len + a + 1)
        state = state.replace(drafts=new, draft_probs=q, n_drafts=jnp.where(a == n_drafts, k, 0))
    else:
        state = state.replace(n_drafts=jnp.zeros_like(n_drafts))
    return _emit(state, spec, emitted, a + 1, nxt)


def _tree_round(plan: DecodePlan, inp: Inputs, state: DecodeState, tree: DraftTree, ngram=None) -> DecodeState:
    """One tree pass: verify every candidate path at once, keep the longest accepted one, draft the next.

    `tree` is spec.tree or spec.tree.without_ngram() (its first nodes, same look-ahead blocks);
    ngram = (tokens, valid) [B, tree.ngram] are the n-gram chain's candidates.
    """
    params, cfg, spec, ops = inp.params, plan.cfg, plan.spec, plan.round_ops
    k, b = spec.k, state.pending.shape[0]
    n, n_blocks = tree.num_nodes, tree.num_blocks(k)
    depth, ancestors = jnp.asarray(tree.depth), jnp.asarray(tree.ancestors)
    # candidates [B, N]: the pending token (root), look-ahead ranks, then the n-gram chain
    tokens, valid = [state.pending[:, None]], [jnp.ones((b, 1), bool)]
    if tree.paths:
        la_depth = jnp.asarray([len(p) - 1 for p in tree.paths])
        tokens.append(state.top_candidates[:, la_depth, jnp.asarray([p[-1] for p in tree.paths])])
        valid.append(la_depth[None] < state.n_drafts[:, None])
    if tree.ngram:
        tokens.append(ngram[0])
        valid.append(ngram[1])
    tokens, valid = jnp.concatenate(tokens, 1), jnp.concatenate(valid, 1)
    embeds = cfg.embed(params, tokens, ops)
    if n_blocks:
        blocks = jnp.tile(inp.lookahead.astype(jnp.float32), (n_blocks, 1))
        embeds = jnp.concatenate([embeds, jnp.broadcast_to(blocks, (b,) + blocks.shape)], 1)
    offsets, block_mask = tree.layout(k)
    hidden, cache = _forward(plan, inp, embeds, state.cache.lengths[:, None] + offsets[None],
                             jnp.broadcast_to(block_mask, (b,) + block_mask.shape), state.cache, n, ops)
    keys = position_keys(inp.row_keys, state.out_len[:, None] + depth[None])[:, :, EMIT]
    logits = cfg.logits(params, hidden, ops)  # every slot at once: the head's weights are read once a round
    end, draws = verify_tree(logits[:, :n], tokens, valid, tree.parents, ancestors, spec.sampler, keys)
    a = depth[end]  # accepted drafts
    # path[b, d]: the accepted node at depth d; emit its drafts, then the model's draw at the end node
    d = jnp.arange(tree.max_depth + 1)
    path = jnp.argmax(ancestors[end][:, None, :] & (depth[None, None, :] == d[None, :, None]), -1)
    nxt = jnp.take_along_axis(draws, end[:, None], 1)[:, 0]
    drafted = jnp.take_along_axis(tokens, path, 1)
    emitted = jnp.where(d[None] == a[:, None], nxt[:, None], jnp.concatenate([drafted[:, 1:], drafted[:, :1]], 1))
    if np.any(tree.parents[1:] != np.arange(n - 1)):  # a chain's accepted path is already contiguous
        cache = cache.gather_path(path, ops)
    live = ~state.done
    hits = jnp.sum(ancestors[end] & live[:, None], 0)  # the full tree's first n nodes are this tree's nodes
    state = state.replace(
        cache=cache,
        accepted=state.accepted + jnp.sum((a[:, None] > jnp.arange(spec.max_drafts)[None]) & live[:, None], 0),
        draft_rounds=state.draft_rounds + live.sum(),
        node_hits=state.node_hits + jnp.pad(hits, (0, state.node_hits.shape[0] - n)),
    )
    if n_blocks:  # next drafts: the block of the deepest accepted node that has one, shifted past the accepted
        with_block = ancestors[end] & (jnp.arange(n) < n_blocks)[None]
        owner = jnp.argmax(jnp.where(with_block, depth[None], -1), 1)
        shift = a - depth[owner]
        slots = n + owner[:, None] * k + jnp.minimum(shift[:, None] + jnp.arange(k)[None], k - 1)
        la_logits = jnp.take_along_axis(logits, slots[..., None], 1)
        state = state.replace(top_candidates=top_k(la_logits, tree.max_rank)[1].astype(jnp.int32),
                              n_drafts=jnp.maximum(k - shift, 0))
    return _emit(state, spec, emitted, a + 1, nxt)


def _prefill(plan: DecodePlan, inp: Inputs) -> DecodeState:
    """Run the padded prompts (then a look-ahead block after each row's last token); emit the first token."""
    params, cfg, spec, prompts = inp.params, plan.cfg, plan.spec, inp.prompts
    b, tp = prompts.shape
    use_la, k = spec.draft.lookahead, spec.k
    # A prompt's entries must not depend on the cache buffer's length, which differs between methods:
    # the backend's prefill variant of its ops (ops.for_prefill) sees to it.
    ops = plan.backend.for_prefill()
    cache = KVCache.create(cfg, b, plan.max_len, params_dtype(params))
    last = inp.prompt_lens - 1
    positions, mask = block_layout(cache.lengths, last, tp, 0)
    hidden, cache = _forward(plan, inp, cfg.embed(params, prompts, ops), positions, mask, cache, tp, ops)
    if use_la:
        la_hidden, cache = _prefill_lookahead(plan, inp, cache, last, ops)
    rows = jnp.arange(b)
    logits = cfg.logits(params, hidden[rows, last], ops)[:, None]
    zero = jnp.zeros((b,), jnp.int32)
    keys = position_keys(inp.row_keys, zero[:, None])
    _, first = verify(logits, prompts[:, :0], jnp.zeros((b, 0, 1)), zero, spec.sampler, keys)
    v = cfg.vocab_size if not spec.sampler.greedy and spec.method in ("pass", "speculative") and not spec.is_tree else 1
    state = DecodeState(
        cache=cache, pending=first, drafts=jnp.zeros((b, k), jnp.int32), draft_probs=jnp.zeros((b, k, v)),
        n_drafts=zero, out=jnp.zeros((b, spec.max_new_tokens + spec.block_tokens + 1), jnp.int32), out_len=zero,
        done=jnp.zeros((b,), bool), row_passes=zero, calls=jnp.int32(0),
        accepted=jnp.zeros((spec.max_drafts,), jnp.int32), draft_rounds=jnp.int32(0),
        node_hits=jnp.zeros((spec.tree.num_nodes,), jnp.int32) if spec.is_tree else None,
        ngram_rows=jnp.int32(0) if spec.is_tree and spec.tree.ngram else None)
    if use_la and spec.is_tree:
        top = top_k(cfg.logits(params, la_hidden, ops), spec.tree.max_rank)[1]
        state = state.replace(top_candidates=top.astype(jnp.int32), n_drafts=jnp.full((b,), k, jnp.int32))
    elif use_la:
        new, q = _drafts_from_logits(cfg.logits(params, la_hidden, ops), spec, inp.row_keys,
                                     jnp.ones((b,), jnp.int32))
        state = state.replace(drafts=new, draft_probs=q.astype(jnp.float32), n_drafts=jnp.full((b,), k, jnp.int32))
    return _emit(state, spec, first[:, None], jnp.ones_like(zero), first, commit=inp.prompt_lens)


def _prefill_lookahead(plan: DecodePlan, inp: Inputs, cache: KVCache, last, ops: XlaOps):
    """The look-ahead block after each row's last prompt token, as a pass of its own (written after the
    padded prompt, seeing the prompt up to `last`): the prompt's own pass is then exactly autoregressive
    decoding's, whichever implementation the backend takes for a pass of that size."""
    b, tp, k = inp.prompts.shape[0], inp.prompts.shape[1], plan.spec.k
    embeds = jnp.broadcast_to(inp.lookahead.astype(jnp.float32), (b,) + inp.lookahead.shape)
    slot, i = jnp.arange(cache.max_len)[None, None, :], jnp.arange(k)[None, :, None]
    visible = (slot <= last[:, None, None]) | ((slot >= tp) & (slot <= tp + i))
    after = cache.replace(lengths=jnp.full((b,), tp, jnp.int32))
    hidden, after = _forward(plan, inp, embeds, last[:, None] + 1 + jnp.arange(k)[None], None, after, 0, ops, visible)
    return hidden, after.replace(lengths=cache.lengths)


def _draft_with_model(plan: DecodePlan, inp: Inputs, state: DecodeState) -> DecodeState:
    """Two-model speculative sampling: the draft model proposes k tokens, one pass each.

    It also consumes its k-th draft (k+1 passes), so its cache holds every token the target may
    accept; after verification its lengths are reset to the target's.
    """
    params, cfg, spec, ops = inp.draft_params, plan.draft_cfg, plan.spec, plan.round_ops
    b, k = state.pending.shape[0], spec.k
    ones = jnp.ones((b, 1, 1), bool)

    def one(i, carry):
        cache, token, drafts, probs = carry
        hidden, cache = cfg.forward(params, cfg.embed(params, token[:, None], ops), cache.lengths[:, None], ones,
                                    cache, ops=ops)
        new, q = _drafts_from_logits(cfg.logits(params, hidden, ops), spec, inp.row_keys, state.out_len + i)
        drafts = jax.lax.dynamic_update_slice_in_dim(drafts, new, jnp.minimum(i, k - 1), 1)
        probs = jax.lax.dynamic_update_slice_in_dim(probs, q.astype(probs.dtype), jnp.minimum(i, k - 1), 1)
        keep = i < k  # the extra pass only writes the last draft into the cache
        return cache.commit(jnp.ones((b,), jnp.int32)), jnp.where(keep, new[:, 0], token), \
            jnp.where(keep, drafts, carry[2]), jnp.where(keep, probs, carry[3])

    cache, _, drafts, probs = jax.lax.fori_loop(0, k + 1, one, (state.draft_cache, state.pending, state.drafts,
                                                               state.draft_probs))
    return state.replace(draft_cache=cache, drafts=drafts, draft_probs=probs, n_drafts=jnp.full((b,), k, jnp.int32))


def _prefill_draft_model(plan: DecodePlan, inp: Inputs, state: DecodeState) -> DecodeState:
    """The draft model's own cache over the prompts, at the target's lengths."""
    b, tp = inp.prompts.shape
    params, cfg = inp.draft_params, plan.draft_cfg
    _, cache = cfg.forward(params, cfg.embed(params, inp.prompts, plan.backend),
                       jnp.broadcast_to(jnp.arange(tp), (b, tp)), causal_block_mask(jnp.ones((b, tp), bool)),
                       KVCache.create(cfg, b, plan.max_len, params_dtype(params)), ops=plan.backend)
    return state.replace(draft_cache=cache.replace(lengths=state.cache.lengths))


# ---- the draft methods: what one round of each does ---------------------------------------------
def _tree_method_round(plan, inp, st):
    """A tree round; the n-gram chain rides along only when some live row found a match worth drafting
    (ngram_min tokens or more), so rounds without one cost what the rest of the tree costs (for
    method "ngram": an autoregressive step)."""
    tree = plan.spec.tree
    if not tree.ngram:
        return _tree_round(plan, inp, st, tree)
    history = row_history(inp.prompts, inp.prompt_lens, st.out)
    tokens, valid, matched = prompt_lookup(history, inp.prompt_lens + st.out_len, tree.ngram_n, tree.ngram)
    valid &= (matched >= tree.ngram_min)[:, None]
    st = st.replace(ngram_rows=st.ngram_rows + jnp.sum(valid[:, 0] & ~st.done))
    if tree.ngram_min == 1:  # every match is drafted: always the full tree
        return _tree_round(plan, inp, st, tree, (tokens, valid))
    return jax.lax.cond(jnp.any(valid[:, 0] & ~st.done), lambda s: _tree_round(plan, inp, s, tree, (tokens, valid)),
                        lambda s: _tree_round(plan, inp, s, tree.without_ngram()), st)



def _ar_round(plan, inp, st):
    return _round(plan, inp, st, use_drafts=False, use_la=False)


def _paper_round(plan, inp, st):
    """The previous pass drafted: validate, then draft unless every row is done."""
    st = _round(plan, inp, st, use_drafts=True, use_la=False)
    return jax.lax.cond(jnp.all(st.done), lambda s: s, lambda s: _round(plan, inp, s, False, True), st)


def _fused_round(plan, inp, st):
    """Validate and draft in one pass; skip the draft slots when no live row holds drafts."""
    return jax.lax.cond(jnp.any((st.n_drafts > 0) & ~st.done), lambda s: _round(plan, inp, s, True, True),
                        lambda s: _round(plan, inp, s, False, True), st)


def _speculative_round(plan, inp, st):
    st = _round(plan, inp, _draft_with_model(plan, inp, st), use_drafts=True, use_la=False)
    return st.replace(draft_cache=st.draft_cache.replace(lengths=st.cache.lengths))


@dataclasses.dataclass(frozen=True)
class DraftMethod:
    """A decoding method as the loop sees it. Adding one is one entry in DRAFT_METHODS."""

    round: Callable  # (plan, inputs, state) -> state: one iteration of the while_loop
    block_tokens: Callable  # (spec) -> tokens a round writes past the committed cache
    lookahead: bool = False  # the prefill appends a look-ahead block; rounds read look-ahead outputs
    tree: bool = False  # deterministic candidates verified as a tree (spec.tree)
    prefill: Callable | None = None  # (plan, inputs, state) -> state: extra set-up after the prefill


DRAFT_METHODS = {
    "ar": DraftMethod(_ar_round, lambda spec: 1),
    "pass/tree": DraftMethod(_tree_method_round, lambda spec: spec.tree.num_tokens(spec.k), lookahead=True, tree=True),
    "pass/fused": DraftMethod(_fused_round, lambda spec: 1 + 2 * spec.k, lookahead=True),
    "pass/paper": DraftMethod(_paper_round, lambda spec: 1 + 2 * spec.k, lookahead=True),
    "ngram": DraftMethod(_tree_method_round, lambda spec: spec.tree.num_tokens(0), tree=True),
    "speculative": DraftMethod(_speculative_round, lambda spec: 1 + spec.k, prefill=_prefill_draft_model),
}
METHODS = ("ar", "pass", "ngram", "speculative")
VARIANTS = ("tree", "fused", "paper")


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Everything static about a generation call (the jit cache key): the model's config, the
    spec, the KV cache size and the draft model's config. Calling it is the whole decode: pure,
    one `lax.while_loop`; under `jax.jit` pass the plan as a static argument (or close over it)."""

    cfg: Decoder
    spec: DecodeSpec
    max_len: int
    draft_cfg: Decoder | None = None
    mesh: Mesh | None = None  # a (data, model) mesh: the KV caches are pinned to sharding.CACHE_AXES
    max_position: int | None = None  # the last RoPE position a pass may use (None: any)
    ops: XlaOps | None = None  # the backend (pass_jax.ops; None: backends.default_ops(), this process's choice)

    @property
    def backend(self) -> XlaOps:
        return resolve(self.ops)

    @property
    def round_ops(self) -> XlaOps:
        """The ops every round is traced with (ops.for_rounds: a backend whose arithmetic depends on the
        pass size makes a token's arithmetic in a verify pass a 1-token step's here)."""
        return self.backend.for_rounds()

    def _pin(self, state: DecodeState) -> DecodeState:
        """On a mesh, keep the loop carry's KV caches split by the rules (rows over "data", KV heads
        over "model") rather than wherever GSPMD's propagation would put them."""
        if self.mesh is None:
            return state
        draft = None if state.draft_cache is None else constrain_cache(state.draft_cache, self.mesh)
        return state.replace(cache=constrain_cache(state.cache, self.mesh), draft_cache=draft)

    def __call__(self, params, lookahead, prompts, prompt_lens, key, draft_params=None) -> DecodeState:
        """prompts [B, Tp] padded, prompt_lens [B], key a PRNG key; returns the final DecodeState."""
        row_keys = jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(prompts.shape[0])))
        embeds, prefix = split_lookahead(lookahead)
        inp = Inputs(params, embeds, prompts, prompt_lens, row_keys, draft_params, prefix)
        method = self.spec.draft
        state = _prefill(self, inp)
        if method.prefill is not None:
            state = method.prefill(self, inp, state)
        return jax.lax.while_loop(lambda st: ~jnp.all(st.done), lambda st: self._pin(method.round(self, inp, st)),
                                  self._pin(state))
