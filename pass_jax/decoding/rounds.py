"""The steps every decoding method is made of: one `_round` (chain drafts) or `_tree_round` (a tree of
candidates) per pass, the prefill, and two-model drafting.

`_round` runs [pending token, drafts?, look-ahead block?] through the model, verifies the drafts (none
for autoregressive decoding), emits the accepted drafts plus one exact token, commits that many cache
entries, and takes new drafts from the look-ahead outputs. `_tree_round` runs [pending token, candidate
nodes, a look-ahead block per node] in one pass, candidates from the look-ahead outputs (top-c per
position) and from context n-grams; the accepted path is moved to the front of the cache block, and the
block of the deepest accepted node that has one drafts the next round, so with a block on every node
there are no draft-less rounds (with fewer blocks, a path that runs k or more tokens past its block has
none). How the methods combine them: decoding.methods.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..backends.xla import XlaOps
from ..models.cache import KVCache, write_block
from ..models.contract import causal_block_mask, params_dtype
from .sampling import DRAFT, EMIT, position_keys, sample, top_k, verify, verify_tree
from .spec import DecodePlan, DecodeSpec, DecodeState, Inputs
from .tree import DraftTree


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


def _tree_round(plan: DecodePlan, inp: Inputs, state: DecodeState, tree: DraftTree, ngram=None,
                node_index=None) -> DecodeState:
    """One tree pass: verify every candidate path at once, keep the longest accepted one, draft the next.

    `tree` is spec.tree or a part of it (decoding.adaptive's options; without_ngram(): its first nodes,
    same look-ahead blocks); ngram = (tokens, valid) [B, tree.ngram] are the n-gram chain's candidates;
    node_index [tree.num_nodes]: where its nodes sit in spec.tree (default: its first nodes).
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
    hits = jnp.sum(ancestors[end] & live[:, None], 0)
    node_index = np.arange(n) if node_index is None else node_index
    state = state.replace(
        cache=cache,
        accepted=state.accepted + jnp.sum((a[:, None] > jnp.arange(spec.max_drafts)[None]) & live[:, None], 0),
        draft_rounds=state.draft_rounds + live.sum(),
        node_hits=state.node_hits.at[node_index].add(hits),
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
    use_la, k = spec.method.lookahead, spec.k
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
    v = cfg.vocab_size if not spec.sampler.greedy and spec.method.chain_drafts else 1
    state = DecodeState(
        cache=cache, pending=first, drafts=jnp.zeros((b, k), jnp.int32), draft_probs=jnp.zeros((b, k, v)),
        n_drafts=zero, out=jnp.zeros((b, spec.max_new_tokens + spec.block_tokens + 1), jnp.int32), out_len=zero,
        done=jnp.zeros((b,), bool), row_passes=zero, calls=jnp.int32(0),
        accepted=jnp.zeros((spec.max_drafts,), jnp.int32), draft_rounds=jnp.int32(0),
        node_hits=jnp.zeros((spec.tree.num_nodes,), jnp.int32) if spec.is_tree else None,
        ngram_rows=jnp.int32(0) if spec.is_tree and spec.tree.ngram else None)
    if plan.pass_costs is not None:  # adaptive drafting's running means and its choices (decoding.adaptive)
        state = state.replace(gains=jnp.zeros((3,), jnp.float32), gain_rows=jnp.zeros((3,), jnp.float32),
                              choices=jnp.zeros((len(plan.pass_costs),), jnp.int32))
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
