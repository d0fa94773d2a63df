"""Sampled PaSS has exactly the autoregressive distribution: chi-square against exact enumeration.

Power: with N samples, any error of total variation eps adds at least 4 N eps^2 to the expected
statistic (Cauchy-Schwarz). With N = 40000 and 27 cells that is >= 64 for eps = 2%, against a
critical value near 54 at alpha = 1e-3 (df 26): such an error fails the test almost surely.
The broken-rule test below shows the power on a real mistake.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import pass_jax as pj
import pass_jax.api as api_mod
import pass_jax.decoding.rounds as decode_mod
from pass_jax.decoding.sampling import EMIT, sample
from pass_jax.decoding.tree import DraftTree
from pass_jax.models.cache import KVCache
from pass_jax.models.contract import causal_block_mask
from pass_jax.models.llama import embed_tokens, forward, logits_from_hidden

from .conftest import tiny_model

N_SAMPLES, N_TOKENS, PROMPT = 40_000, 3, [1, 0, 2]


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=3, hidden=16, layers=1, heads=2, kv_heads=1, seed=4, scale=0.4)


def exact_distribution(m, sampler):
    """P(first N_TOKENS tokens = seq) for every seq, by running the model on every continuation."""
    seqs = np.array(list(itertools.product(range(m.config.vocab_size), repeat=N_TOKENS)))
    ids = jnp.asarray(np.concatenate([np.tile(PROMPT, (len(seqs), 1)), seqs], 1))
    b, t = ids.shape
    hidden, _ = forward(m.params, m.config, embed_tokens(m.params, ids), jnp.broadcast_to(jnp.arange(t), (b, t)),
                        causal_block_mask(jnp.ones((b, t), bool)), KVCache.create(m.config, b, t))
    probs = sampler.probs(logits_from_hidden(m.params, hidden)[:, len(PROMPT) - 1:-1])  # [S, N_TOKENS, V]
    return seqs, np.prod(np.take_along_axis(np.asarray(probs), seqs[..., None], 2)[..., 0], axis=1)


def chi_square_pvalue(m, sampler, **kw):
    seqs, p = exact_distribution(m, sampler)
    r = pj.generate(m, [PROMPT] * N_SAMPLES, max_new_tokens=N_TOKENS, eos_token_id=(), seed=11,
                    temperature=sampler.temperature, top_k=sampler.top_k, top_p=sampler.top_p, **kw)
    got = np.array(r.token_ids)
    index = {tuple(s): i for i, s in enumerate(seqs)}
    counts = np.bincount([index[tuple(s)] for s in got], minlength=len(seqs))
    assert counts[p == 0].sum() == 0, "sampled a sequence of probability zero"
    small = (p > 0) & (p * N_SAMPLES < 5)  # pooled into one cell, as the chi-square approximation needs
    big = p * N_SAMPLES >= 5
    observed, expected = counts[big], p[big].astype(np.float64)
    if small.any():
        observed, expected = np.append(observed, counts[small].sum()), np.append(expected, p[small].sum())
    return stats.chisquare(observed, expected / expected.sum() * observed.sum()).pvalue, r


SAMPLERS = [pj.Sampler(1.0), pj.Sampler(0.8, top_k=2), pj.Sampler(1.3, top_p=0.8)]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=["T1", "T0.8-topk2", "T1.3-topp0.8"])
@pytest.mark.parametrize("variant", ["fused", "paper"])
def test_sampled_pass_matches_exact_distribution(model, sampler, variant):
    la = pj.init_lookahead(model.params, 2, "random", key=jax.random.key(2))
    pvalue, r = chi_square_pvalue(model, sampler, method="pass", k=2, lookahead=la, variant=variant)
    assert 0 < r.stats.acceptance_by_position[0] < 1, "drafts must be both accepted and rejected"
    assert pvalue > 1e-3


def test_autoregressive_sampling_matches_exact_distribution(model):
    assert chi_square_pvalue(model, SAMPLERS[0])[0] > 1e-3


def _accept_every_draft(logits, drafts, draft_probs, n_drafts, sampler, keys):
    """The broken rule: keep every draft, then sample the next token from the target."""
    p = sampler.probs(logits)
    return n_drafts, sample(jnp.take_along_axis(p, n_drafts[:, None, None], 1)[:, 0], keys[:, 0, EMIT])


@pytest.fixture
def broken_rule(monkeypatch):
    """Swap in the broken rule; jit caches are cleared before and after so no trace leaks either way."""
    jax.clear_caches()
    monkeypatch.setattr(decode_mod, "verify", _accept_every_draft)
    monkeypatch.setattr(api_mod, "_COMPILED", {})
    yield
    monkeypatch.undo()
    jax.clear_caches()


def test_chi_square_detects_a_broken_acceptance_rule(model, broken_rule):
    la = pj.init_lookahead(model.params, 2, "random", key=jax.random.key(2))
    pvalue, _ = chi_square_pvalue(model, SAMPLERS[0], method="pass", k=2, lookahead=la, variant="fused")
    assert pvalue < 1e-6


@pytest.fixture(scope="module")
def draft_model():
    return tiny_model(vocab=3, hidden=16, layers=1, heads=2, kv_heads=2, seed=9, scale=0.4)


def test_speculative_sampling_matches_exact_distribution(model, draft_model):
    pvalue, r = chi_square_pvalue(model, SAMPLERS[1], method="speculative", k=2, draft_model=draft_model)
    assert 0 < r.stats.acceptance_by_position[0] < 1
    assert pvalue > 1e-3


def test_chi_square_detects_a_broken_rule_in_speculative_sampling(model, draft_model, broken_rule):
    pvalue, _ = chi_square_pvalue(model, SAMPLERS[0], method="speculative", k=2, draft_model=draft_model)
    assert pvalue < 1e-6


# two look-ahead siblings at depth 1 plus an n-gram chain: three candidates can share a parent. The tree
# tests run the whole tree every round (pass_costs=None): the rule under test, whatever this machine's pass
# costs would make adaptive drafting choose at 40000 rows (adaptive rounds sample what autoregressive
# sampling does, seed for seed: tests/test_adaptive.py)
TREE = DraftTree.parse("2,1;ngram=2")


@pytest.mark.parametrize("sampler", SAMPLERS, ids=["T1", "T0.8-topk2", "T1.3-topp0.8"])
def test_sampled_tree_matches_exact_distribution(model, sampler):
    la = pj.init_lookahead(model.params, 2, "random", key=jax.random.key(2))
    pvalue, r = chi_square_pvalue(model, sampler, method="pass", variant="tree", k=2, lookahead=la, tree=TREE,
                                  pass_costs=None)
    assert 0 < r.stats.acceptance_by_position[0] < 1, "drafts must be both accepted and rejected"
    assert pvalue > 1e-3


def test_sampled_ngram_matches_exact_distribution(model):
    pvalue, r = chi_square_pvalue(model, SAMPLERS[1], method="ngram", tree="ngram=2", pass_costs=None)
    assert 0 < r.stats.acceptance_by_position[0] < 1
    assert pvalue > 1e-3


def _siblings_without_residual(logits, tokens, valid, parents, ancestors, sampler, keys):
    """The broken rule: accept each candidate with probability p(candidate) on its own uniform, never
    renormalizing after a rejected sibling, and emit a draw from p (not the residual) at the end."""
    p = sampler.probs(logits)
    u = jax.vmap(jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1))))(keys)
    p_tok = jnp.take_along_axis(p[:, parents], tokens[..., None], 2)[..., 0]
    accepted = (valid & (u < p_tok)).at[:, 0].set(True)
    on_path = ~jnp.any(jnp.asarray(ancestors)[None] & ~accepted[:, None, :], -1)
    depth = jnp.sum(jnp.asarray(ancestors), -1) - 1
    return jnp.argmax(jnp.where(on_path, depth[None], -1), 1).astype(jnp.int32), sample(p, keys)


def test_chi_square_detects_a_tree_rule_without_renormalized_residual(model, monkeypatch):
    jax.clear_caches()
    monkeypatch.setattr(decode_mod, "verify_tree", _siblings_without_residual)
    monkeypatch.setattr(api_mod, "_COMPILED", {})
    try:
        la = pj.init_lookahead(model.params, 2, "random", key=jax.random.key(2))
        pvalue, _ = chi_square_pvalue(model, SAMPLERS[0], method="pass", variant="tree", k=2, lookahead=la, tree=TREE,
                                     pass_costs=None)
        assert pvalue < 1e-6
    finally:
        monkeypatch.undo()
        jax.clear_caches()
