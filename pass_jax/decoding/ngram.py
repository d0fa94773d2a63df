"""Prompt lookup: draft the tokens that followed the last earlier occurrence of the current suffix.

Code and chat answers repeat their context (names, signatures, quoted text), so the tokens after an
earlier occurrence of the last few tokens are free drafts. Jitted and per row: every row searches
its own prompt + output.
"""

from __future__ import annotations

import jax.numpy as jnp


def row_history(prompts, prompt_lens, out):
    """[B, Tp + W] each row's prompt followed by its output, contiguous (the padding squeezed out)."""
    tp = prompts.shape[1]
    j = jnp.arange(tp + out.shape[1])[None]
    from_out = jnp.take_along_axis(out, jnp.clip(j - prompt_lens[:, None], 0, out.shape[1] - 1), 1)
    from_prompt = jnp.take_along_axis(prompts, jnp.clip(j, 0, tp - 1), 1)
    return jnp.where(j < prompt_lens[:, None], from_prompt, from_out)


def prompt_lookup(history, length, max_ngram: int, m: int):
    """(tokens [B, m], valid [B, m], matched [B]): continuation of the longest suffix (<= max_ngram tokens) of
    history[b, :length[b]] that also occurs earlier, taken from its most recent earlier occurrence
    that is followed by m known tokens (or by as many as any occurrence is), and the matched suffix's
    length (0: no match).

    One pass over the row, every suffix length at once: run[b, e] is how many tokens ending at e
    match the suffix's last ones (a few fused ops a round, not a loop of compares per length)."""
    h = history.shape[1]
    e = jnp.arange(h)[None]  # where an earlier occurrence ends; its continuation starts at e + 1
    back = jnp.stack([jnp.pad(history, ((0, 0), (s, 0)), constant_values=-1)[:, :h] for s in range(max_ngram)], -1)
    tail_at = length[:, None] - 1 - jnp.arange(max_ngram)[None]  # [B, N] the suffix, last token first
    tail = jnp.where(tail_at >= 0, jnp.take_along_axis(history, jnp.clip(tail_at, 0, h - 1), 1), -2)
    run = jnp.sum(jnp.cumprod((back == tail[:, None, :]).astype(jnp.int32), -1), -1)  # [B, H]
    run = jnp.where(e + 1 < length[:, None], run, 0)  # an earlier occurrence, followed by a known token
    matched = jnp.max(run, 1)
    # the most recent occurrence among those followed by the most known tokens (up to m): in a
    # repeating run the latest occurrence overlaps the suffix and has only one token after it
    room = jnp.minimum(length[:, None] - (e + 1), m)
    best = jnp.max(jnp.where((run >= matched[:, None]) & (run > 0), room * h + e, -1), axis=1)
    cont = jnp.where(best >= 0, best % h + 1, -1)
    idx = cont[:, None] + jnp.arange(m)[None]
    tokens = jnp.take_along_axis(history, jnp.clip(idx, 0, h - 1), 1)
    return tokens, (cont[:, None] >= 0) & (idx < length[:, None]), matched


def tree_ngram_candidates(tree, prompts, prompt_lens, out, out_len):
    """(tokens, valid) [B, tree.ngram]: each row's n-gram chain for a tree round, valid only where the
    matched suffix is tree.ngram_min tokens or longer (a shorter match is not worth drafting)."""
    history = row_history(prompts, prompt_lens, out)
    tokens, valid, matched = prompt_lookup(history, prompt_lens + out_len, tree.ngram_n, tree.ngram)
    return tokens, valid & (matched >= tree.ngram_min)[:, None]
