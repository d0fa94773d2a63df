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
    length (0: no match)."""
    b, h = history.shape
    j = jnp.arange(h)[None]
    cont = jnp.full((b,), -1, jnp.int32)  # where the continuation starts; -1 = no match yet
    matched = jnp.zeros((b,), jnp.int32)  # length of the suffix that matched
    for n in range(max_ngram, 0, -1):  # longest suffix first
        suffix = jnp.take_along_axis(history, jnp.clip(length[:, None] - n + jnp.arange(n)[None], 0, h - 1), 1)
        match = j + n < length[:, None]  # an earlier occurrence, followed by a known token
        for t in range(n):
            shifted = jnp.pad(history[:, t:], ((0, 0), (0, t)), constant_values=-1)
            match &= shifted == suffix[:, t:t + 1]
        # the most recent occurrence among those followed by the most known tokens (up to m): in a
        # repeating run the latest occurrence overlaps the suffix and has only one token after it
        room = jnp.minimum(length[:, None] - (j + n), m)
        best = jnp.max(jnp.where(match, room * h + j, -1), axis=1)
        new = (cont < 0) & (best >= 0)
        cont, matched = jnp.where(new, best % h + n, cont), jnp.where(new, n, matched)
    idx = cont[:, None] + jnp.arange(m)[None]
    tokens = jnp.take_along_axis(history, jnp.clip(idx, 0, h - 1), 1)
    return tokens, (cont[:, None] >= 0) & (idx < length[:, None]), matched


def tree_ngram_candidates(tree, prompts, prompt_lens, out, out_len):
    """(tokens, valid) [B, tree.ngram]: each row's n-gram chain for a tree round, valid only where the
    matched suffix is tree.ngram_min tokens or longer (a shorter match is not worth drafting)."""
    history = row_history(prompts, prompt_lens, out)
    tokens, valid, matched = prompt_lookup(history, prompt_lens + out_len, tree.ngram_n, tree.ngram)
    return tokens, valid & (matched >= tree.ngram_min)[:, None]
