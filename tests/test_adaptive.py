"""Adaptive drafting: each round's tree chosen from pass costs and expected acceptance, never changing a token."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pass_jax as pj
from pass_jax.decoding import adaptive, costs
from pass_jax.decoding.plan import DEFAULT_TREE
from pass_jax.decoding.tree import DraftTree

from .conftest import tiny_model

# four options for the default tree: ar, ngram, tree, full (cheapest first)
ONLY_AR_PAYS = (1.0, 50.0, 50.0, 50.0)
FLAT = (1.0, 1.0, 1.0, 1.0)


def _model():
    return tiny_model(vocab=24, hidden=32, layers=2, heads=4, kv_heads=2, seed=4, scale=0.7)


def _prompts(batch: int) -> list[list[int]]:
    """Rows that repeat themselves (n-gram matches) and rows that do not, lengths 2..11."""
    rng = np.random.default_rng(batch)
    out = []
    for b in range(batch):
        p = rng.integers(0, 24, 2 + b % 10).tolist()
        out.append(p + p if b % 2 else p)
    return out


def test_options_of_the_default_tree():
    opts = adaptive.options(DEFAULT_TREE, lookahead=True)
    assert [o.name for o in opts] == ["ar", "ngram", "tree", "full"]
    assert adaptive.option_tokens(DEFAULT_TREE, True, 1) == (1, 5, 4, 12)
    assert [o.name for o in adaptive.options(DraftTree(ngram=4, ngram_min=2), lookahead=False)] == ["ar", "ngram"]
    full = opts[-1].tree
    for o in opts:  # each option's nodes are the full tree's nodes at node_index: same depth, same parent's place
        assert (full.depth[list(o.node_index)] == o.tree.depth).all()


def test_expected_tokens_weigh_each_source():
    opts = adaptive.options(DEFAULT_TREE, lookahead=True)
    live = jnp.array([True, True, True, False])
    ngram = jnp.array([True, False, False, False])
    big = 1e6  # measured means that swamp the prior: look-ahead 0.5, n-gram 3, both 3.2 accepted per row
    got = adaptive.expected_tokens(opts, live, ngram, jnp.array([0.5, 3, 3.2]) * big, jnp.full((3,), big))
    np.testing.assert_allclose(got, [3, 3 + 3, 3 * 1.5, 3 + 0.5 * 2 + 3.2], rtol=1e-4)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("pass_costs", [ONLY_AR_PAYS, FLAT])
def test_greedy_adaptive_pass_is_autoregressive_decoding(batch, pass_costs):
    m = _model()
    prompts = _prompts(batch)
    ar = pj.generate(m, prompts, max_new_tokens=20, eos_token_id=())
    got = pj.generate(m, prompts, max_new_tokens=20, eos_token_id=(), method="pass", pass_costs=pass_costs)
    assert got.token_ids == ar.token_ids
    shares = got.stats.round_options
    assert set(shares) == {"ar", "ngram", "tree", "full"} and sum(shares.values()) == pytest.approx(1)
    assert got.stats.drafting_skipped == shares["ar"]
    if pass_costs == ONLY_AR_PAYS:  # after exploring the look-ahead, autoregressive steps
        assert shares["ar"] > 0.4 and shares["ngram"] == 0
    else:  # a flat cost: drafting always pays, never an autoregressive step
        assert shares["ar"] == 0 and got.stats.tokens_per_forward > 1


def test_a_tree_that_cannot_pay_is_never_run():
    """Costs where even an always-right look-ahead loses: autoregressive steps from the first round."""
    m = _model()
    prompts = _prompts(4)
    ar = pj.generate(m, prompts, max_new_tokens=40, eos_token_id=())
    got = pj.generate(m, prompts, max_new_tokens=40, eos_token_id=(), method="pass", pass_costs=ONLY_AR_PAYS)
    assert got.token_ids == ar.token_ids
    assert got.stats.forward_passes == ar.stats.forward_passes and got.stats.drafting_skipped == 1.0


def test_a_tree_that_could_pay_is_explored_then_dropped_if_it_does_not():
    """A tree round at 1.9x an autoregressive step pays only if the look-ahead is right 90% of the time:
    the first rounds measure it (EXPLORE_ROWS rows), then the rounds follow what was measured."""
    m = _model()
    prompts = _prompts(4)
    got = pj.generate(m, prompts, max_new_tokens=40, eos_token_id=(), method="pass", pass_costs=(1.0, 50.0, 1.9, 50.0))
    assert got.stats.acceptance_by_position[0] < 0.2  # a random look-ahead: far below the 90% it needs
    shares, passes = got.stats.round_options, got.stats.forward_passes
    assert round(shares["tree"] * passes) == adaptive.EXPLORE_ROWS // 4  # explored (4 rows a round), then dropped
    assert shares["ar"] > 0.9
    assert got.token_ids == pj.generate(m, prompts, max_new_tokens=40, eos_token_id=()).token_ids


def test_ngram_method_adapts_too():
    m = _model()
    prompts = _prompts(6)
    ar = pj.generate(m, prompts, max_new_tokens=24, eos_token_id=())
    flat = pj.generate(m, prompts, max_new_tokens=24, eos_token_id=(), method="ngram", pass_costs=(1.0, 1.0))
    costly = pj.generate(m, prompts, max_new_tokens=24, eos_token_id=(), method="ngram", pass_costs=(1.0, 50.0))
    assert flat.token_ids == ar.token_ids == costly.token_ids
    assert flat.stats.round_options["ngram"] > 0 and costly.stats.round_options == {"ar": 1.0, "ngram": 0.0}


def test_sampled_adaptive_rows_equal_autoregressive_sampling_for_the_same_seed():
    m = _model()
    prompts = _prompts(5)
    kw = {"max_new_tokens": 20, "eos_token_id": (), "temperature": 1.0, "seed": 7}
    ar = pj.generate(m, prompts, **kw)
    for pass_costs in (ONLY_AR_PAYS, FLAT, (1.0, 1.2, 1.5, 2.5)):
        assert pj.generate(m, prompts, method="pass", pass_costs=pass_costs, **kw).token_ids == ar.token_ids


def test_pass_costs_are_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PASS_JAX_COST_CACHE", str(tmp_path / "costs.json"))
    timed = []
    real = costs._time_pass
    monkeypatch.setattr(costs, "_time_pass", lambda *a: timed.append(a[3:]) or real(*a))
    m = _model()
    first = pj.generate(m, _prompts(2), max_new_tokens=8, method="pass")
    assert sorted(timed) == [(2, 1), (2, 4), (2, 5), (2, 12)]  # batch 2, each option's tokens a row
    table = json.loads((tmp_path / "costs.json").read_text())
    assert len(table) == 4 and all(v > 0 for v in table.values())
    second = pj.generate(m, _prompts(2), max_new_tokens=8, method="pass")
    assert len(timed) == 4 and second.token_ids == first.token_ids  # read back, not measured again
    plan, _ = pj.make_plan(m, prompt_len=16, method="pass", batch_size=2)
    ms = [table[costs.cost_key(m.config, m.params, plan.round_ops, 2, t)] for t in (1, 5, 4, 12)]
    assert plan.pass_costs == costs.relative(ms)


def test_relative_costs_are_stable_to_two_digits():
    assert costs.relative([2.0, 3.01, 8.2]) == (1.0, 1.5, 4.1)
    assert costs.relative([2.0, 3.0, 8.0]) == costs.relative([2.02, 3.03, 8.05])


def test_without_a_batch_size_or_with_none_the_whole_tree_runs_every_round():
    m = _model()
    assert pj.make_plan(m, prompt_len=16, method="pass")[0].pass_costs is None
    assert pj.make_plan(m, prompt_len=16, method="pass", batch_size=2, pass_costs=None)[0].pass_costs is None
    assert pj.make_plan(m, prompt_len=16, method="ar", batch_size=2)[0].pass_costs is None
    res = pj.generate(m, _prompts(2), max_new_tokens=8, method="pass", pass_costs=None)
    assert res.stats.round_options is None and "round_options" not in res.stats.to_dict()


def test_bad_pass_costs_are_one_clear_error():
    m = _model()
    with pytest.raises(ValueError, match="pass_costs needs 4 positive numbers"):
        pj.make_plan(m, prompt_len=16, method="pass", batch_size=2, pass_costs=(1.0, 2.0))
    with pytest.raises(ValueError, match="pass_costs must be 'auto'"):
        pj.make_plan(m, prompt_len=16, method="pass", batch_size=2, pass_costs="fast")


def test_the_adaptive_decode_runs_inside_a_users_jit():
    m = _model()
    prompts = _prompts(3)
    plan, la = pj.make_plan(m, prompt_len=16, max_new_tokens=12, method="pass", eos_token_id=(), batch_size=3,
                            pass_costs=(1.0, 1.2, 1.5, 2.5))
    padded = jnp.asarray([p + [0] * (16 - len(p)) for p in prompts])
    tokens, lengths = jax.jit(pj.decode_fn(plan))(m.params, la, padded, jnp.asarray([len(p) for p in prompts]),
                                                  jax.random.key(0))
    ar = pj.generate(m, prompts, max_new_tokens=12, eos_token_id=())
    assert [np.asarray(tokens)[i, :int(lengths[i])].tolist() for i in range(3)] == ar.token_ids
