"""Tree drafting (look-ahead top-c candidates + context n-grams, one pass per round) is lossless."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pass_jax as pj
from pass_jax.decoding.methods import METHODS
from pass_jax.decoding.ngram import prompt_lookup, row_history
from pass_jax.decoding.spec import DecodePlan, DecodeSpec
from pass_jax.decoding.tree import DraftTree
from pass_jax.models.cache import KVCache
from pass_jax.models.contract import causal_block_mask
from pass_jax.models.llama import embed_tokens, forward

from .conftest import prefill_for_rounds, tiny_model
from .test_pass_greedy import PROMPTS, _constant_model, _eos_inside_budget

TREES = ["3,2,1;ngram=3", "2,2;ngram=0", "3,1;ngram=4;blocks=2;ngram_min=2", "1,1,1", "4;ngram=2;blocks=1"]
REPETITIVE = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [5, 6, 5, 6, 5], [3]]


@pytest.fixture(scope="module")
def small_vocab_model():
    return tiny_model(vocab=7, hidden=32, layers=2, heads=4, kv_heads=2, scale=0.6)


def test_tree_layout_chain_and_branches():
    t = DraftTree.parse("2,1;ngram=2")
    # nodes: root, (0,), (0,0), (1,) (likeliest ends first), ngram 1, ngram 2
    assert t.parents.tolist() == [0, 0, 1, 0, 0, 4]
    assert t.depth.tolist() == [0, 1, 2, 1, 1, 2]
    offsets, mask = t.layout(k=2)
    assert t.num_tokens(2) == 6 + 6 * 2 == len(offsets)
    assert mask[2].tolist()[:6] == [True, True, True, False, False, False]  # (0,0) sees root, (0,) and itself
    assert mask[3].tolist()[:6] == [True, False, False, True, False, False]  # (1,) does not see its sibling
    s = 6 + 2 * 2  # the block of node 2 = (0,0): depths 3, 4; sees node 2's ancestors and its own earlier slots
    assert offsets[s:s + 2].tolist() == [3, 4]
    assert mask[s + 1].tolist() == [True, True, True, False, False, False] + [False] * 4 + [True, True] + [False] * 6
    assert DraftTree.parse("ngram=3").parents.tolist() == [0, 0, 1, 2]


@pytest.mark.parametrize("bad", ["4,x", "widths=3", "0,1"])
def test_tree_parse_errors(bad):
    with pytest.raises(ValueError, match="tree"):
        DraftTree.parse(bad)


def test_prompt_lookup_takes_longest_then_most_recent_match():
    hist = jnp.asarray([[1, 2, 3, 9, 2, 3, 7, 8, 1, 2, 3, 0],  # suffix "1 2 3" (longest) -> 9 2 3
                        [4, 5, 4, 6, 4, 0, 0, 0, 0, 0, 0, 0],  # suffix "4": most recent full one -> 5 4 6
                        [1, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0, 0],  # no earlier occurrence of 5
                        [7, 7, 7, 7, 7, 0, 0, 0, 0, 0, 0, 0],  # a run: the earliest occurrence, 2 followers
                        [4, 6, 0, 4, 8, 4, 0, 0, 0, 0, 0, 0]])  # "4": only 1 follower known after 8 -> 6 0 4
    tokens, ok, matched = prompt_lookup(hist, jnp.asarray([11, 5, 5, 5, 6]), max_ngram=3, m=3)
    assert matched.tolist() == [3, 1, 0, 3, 1]
    assert tokens[0].tolist() == [9, 2, 3] and ok[0].all()
    assert tokens[1].tolist() == [5, 4, 6] and ok[1].all()
    assert not ok[2].any()
    assert tokens[3, :2].tolist() == [7, 7] and ok[3].tolist() == [True, True, False]
    assert tokens[4].tolist() == [6, 0, 4] and ok[4].all()
    tokens, ok, _ = prompt_lookup(hist[3:4], jnp.asarray([3]), max_ngram=3, m=3)  # "7 7 7": "7 7" has 1 follower
    assert tokens[0, :1].tolist() == [7] and ok[0].tolist() == [True, False, False]
    prompts, out = jnp.asarray([[7, 8, 0, 0]]), jnp.asarray([[5, 6, 9]])
    assert row_history(prompts, jnp.asarray([2]), out)[0, :5].tolist() == [7, 8, 5, 6, 9]


def _lookup_by_the_rule(row, length, max_ngram, m):
    """prompt_lookup's rule, one row in plain Python: longest suffix first, then the occurrence followed
    by the most known tokens (up to m), then the most recent."""
    for n in range(min(max_ngram, length - 1), 0, -1):
        suffix = row[length - n:length]
        starts = [j for j in range(length - n) if row[j:j + n] == suffix]
        if starts:
            j = max(starts, key=lambda j: (min(length - j - n, m), j))
            cont = row[j + n:min(j + n + m, length)]
            return cont, n
    return [], 0


@settings(max_examples=60)
@given(st.lists(st.lists(st.integers(0, 3), min_size=12, max_size=12), min_size=1, max_size=4), st.data())
def test_prompt_lookup_follows_its_rule_on_any_history(rows, data):
    lengths = [data.draw(st.integers(1, 12)) for _ in rows]
    tokens, ok, matched = prompt_lookup(jnp.asarray(rows), jnp.asarray(lengths), max_ngram=3, m=3)
    for b, (row, length) in enumerate(zip(rows, lengths)):
        cont, n = _lookup_by_the_rule(row, length, 3, 3)
        assert int(matched[b]) == n
        assert np.asarray(tokens[b])[np.asarray(ok[b])].tolist() == cont and int(ok[b].sum()) == len(cont)


@pytest.mark.parametrize("tree", TREES)
def test_greedy_tree_equals_autoregressive(small_vocab_model, tree):
    m = small_vocab_model
    prompts = PROMPTS + REPETITIVE
    eos = _eos_inside_budget(m, prompts, 40)
    ar = pj.generate(m, prompts, max_new_tokens=40, eos_token_id=eos)
    assert any(len(t) < 40 for t in ar.token_ids), "EOS should stop some row inside the budget"
    for how in ("token", "random"):
        la = pj.init_lookahead(m.params, 3, how, token_id=3, key=jax.random.key(7))
        r = pj.generate(m, prompts, max_new_tokens=40, eos_token_id=eos, method="pass", variant="tree", k=3,
                        lookahead=la, tree=tree)
        assert r.token_ids == ar.token_ids
        assert all(p <= len(t) for p, t in zip(r.stats["row_forward_passes"], r.token_ids))


def test_greedy_ngram_equals_autoregressive_and_accepts_on_repetitive_prompts(small_vocab_model):
    m = small_vocab_model
    ar = pj.generate(m, REPETITIVE, max_new_tokens=40, eos_token_id=())
    r = pj.generate(m, REPETITIVE, max_new_tokens=40, eos_token_id=(), method="ngram", tree="ngram=5", pass_costs=None)
    assert r.token_ids == ar.token_ids
    assert r.stats["acceptance_by_position"][0] > 0.1
    # a model that repeats one token: once its output repeats, every n-gram draft is right
    c = _constant_model()
    r = pj.generate(c, REPETITIVE, max_new_tokens=40, eos_token_id=(), method="ngram", tree="ngram=5", pass_costs=None)
    assert r.token_ids == pj.generate(c, REPETITIVE, max_new_tokens=40, eos_token_id=()).token_ids
    assert r.stats["tokens_per_forward"] > 3.5  # ceiling 6: the first rounds have no repeat yet


@given(
    vocab=st.integers(3, 30),
    kv_heads=st.sampled_from([1, 2, 4]),
    k=st.integers(1, 4),
    widths=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    ngram=st.integers(0, 4),
    blocks=st.one_of(st.none(), st.integers(1, 6)),
    ngram_min=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    prompts=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=12), min_size=1, max_size=3),
    budget=st.integers(1, 24),
)
def test_property_greedy_tree_is_lossless(vocab, kv_heads, k, widths, ngram, blocks, ngram_min, seed, prompts,
                                          budget):
    widths = widths[:k]
    m = tiny_model(vocab=vocab, hidden=32, layers=2, heads=4, kv_heads=kv_heads, seed=seed, scale=0.7)
    la = pj.init_lookahead(m.params, k, "random", key=jax.random.key(seed))
    tree = DraftTree.from_widths(widths, ngram=ngram, la_blocks=blocks, ngram_min=ngram_min)
    ar = pj.generate(m, prompts, max_new_tokens=budget, eos_token_id=())
    r = pj.generate(m, prompts, max_new_tokens=budget, eos_token_id=(), method="pass", variant="tree", k=k,
                    lookahead=la, tree=tree)
    assert r.token_ids == ar.token_ids


@pytest.mark.parametrize("tree", ["3,2,1;ngram=3", "1,1,1,1"])
def test_perfect_drafts_fill_the_tree_every_round(tree):
    m = _constant_model()
    r = pj.generate(m, [[1, 2, 3], [4]], max_new_tokens=41, eos_token_id=(), method="pass", variant="tree", k=4,
                    tree=tree, pass_costs=None)
    assert r.token_ids == pj.generate(m, [[1, 2, 3], [4]], max_new_tokens=41, eos_token_id=()).token_ids
    depth = DraftTree.parse(tree).max_depth
    assert r.stats["row_forward_passes"] == [1 + -(-40 // (depth + 1))] * 2  # prefill, then depth + 1 per pass
    assert r.stats["acceptance_by_position"][:depth][-1] > 0.85


def _ar_cache_keys(m, tokens, n):
    """Layer-0 keys of the first n tokens of `tokens`, from one causal pass."""
    ids = jnp.asarray([tokens[:n]])
    _, cache = forward(m.params, m.config, embed_tokens(m.params, ids), jnp.arange(n)[None],
                       causal_block_mask(jnp.ones((1, n), bool)), KVCache.create(m.config, 1, n))
    return np.asarray(cache.keys[0][0])


def test_compacted_cache_equals_autoregressive_cache_after_every_round(small_vocab_model):
    m, k = small_vocab_model, 3
    prompts = [[1, 2, 3, 1, 2, 3, 1], [4, 5, 6, 0, 1, 2, 3]]
    ar = pj.generate(m, prompts, max_new_tokens=30, eos_token_id=()).token_ids
    spec = DecodeSpec(METHODS["pass/tree"], k, pj.Sampler(), 30, (), DraftTree.parse("3,2;ngram=3;ngram_min=2"))
    plan = DecodePlan(m.config, spec, max_len=96)
    la = pj.init_lookahead(m.params, k, "random", key=jax.random.key(0))
    inp, state = prefill_for_rounds(plan, m.params, la, prompts)
    lens = inp.prompt_lens
    step = jax.jit(functools.partial(plan.spec.method.round, plan))
    # a causal pass over the whole autoregressive sequence: its first n keys are what decoding holds after n
    ar_keys = [_ar_cache_keys(m, p + a, len(p) + len(a)) for p, a in zip(prompts, ar)]
    branched = 0
    while not bool(state.done.all()):
        before = np.asarray(state.out_len)
        state = step(inp, state)
        out_len, lengths = np.asarray(state.out_len), np.asarray(state.cache.lengths)
        np.testing.assert_array_equal(lengths, np.asarray(lens) + out_len - 1)
        for row in range(2):
            assert np.asarray(state.out)[row, :out_len[row]].tolist() == ar[row][:out_len[row]]
            np.testing.assert_allclose(np.asarray(state.cache.keys[0][row, :lengths[row]]),
                                       ar_keys[row][:lengths[row]], atol=2e-5)
            branched += out_len[row] - before[row] > 1
    assert branched >= 3, "the test should see rounds that accepted drafts"


@pytest.mark.parametrize("tree", [pytest.param("3,2,1;ngram=3", marks=pytest.mark.slow), "ngram=4;ngram_min=2"])
def test_sampled_tree_equals_autoregressive_sampling_for_the_same_seed(small_vocab_model, tree):
    m = small_vocab_model
    prompts = PROMPTS + REPETITIVE
    la = pj.init_lookahead(m.params, 3, "random", key=jax.random.key(3))
    method = {"method": "ngram"} if tree.startswith("ngram") else {"method": "pass", "variant": "tree", "k": 3,
                                                                    "lookahead": la}
    for kw in ({"temperature": 1.0}, {"temperature": 0.8, "top_k": 3}, {"temperature": 1.2, "top_p": 0.7}):
        ar = pj.generate(m, prompts, max_new_tokens=30, eos_token_id=(), seed=5, **kw)
        r = pj.generate(m, prompts, max_new_tokens=30, eos_token_id=(), seed=5, tree=tree, pass_costs=None, **method, **kw)
        assert r.token_ids == ar.token_ids
        assert r.stats["tokens_per_forward"] > 1.05


def test_top_k_equals_lax_top_k_with_ties():
    from pass_jax.decoding.sampling import top_k

    x = jax.random.normal(jax.random.key(0), (3, 5000))
    for v in (x, jnp.round(x * 2)):  # many ties
        for k in (1, 10, 50):
            values, idx = top_k(v, k)
            np.testing.assert_array_equal(values, jax.lax.top_k(v, k)[0])
            np.testing.assert_array_equal(np.take_along_axis(np.asarray(v), np.asarray(idx), -1), values)
            assert all(len(set(row)) == k for row in np.asarray(idx).tolist())


def test_top_p_within_top_k_equals_sorting_the_whole_vocabulary():
    logits = jax.random.normal(jax.random.key(1), (4, 3000)) * 3
    fast = pj.Sampler(0.9, top_k=20, top_p=0.8).probs(logits)
    kth = jax.lax.top_k(logits / 0.9, 20)[0][..., -1:]
    full = pj.Sampler(0.9, top_p=0.8).probs(jnp.where(logits / 0.9 < kth, -jnp.inf, logits / 0.9) * 0.9)
    np.testing.assert_allclose(fast, full, atol=1e-6)
    assert int((fast > 0).sum(-1).max()) < 20


def test_decode_fn_composes_with_a_users_jit(small_vocab_model):
    """The pure entry point inside a user's own jitted function: same tokens as generate."""
    m = small_vocab_model
    prompts = [[1, 2, 3, 1, 2], [4, 5, 6, 4, 0]]
    plan, la = pj.make_plan(m, prompt_len=5, max_new_tokens=12, method="pass", k=2, tree="2;ngram=3",
                            eos_token_id=())
    fn = pj.decode_fn(plan)

    @jax.jit
    def pipeline(params, lookahead, prompts, key):  # e.g. generation inside a training or eval step
        tokens, lengths = fn(params, lookahead, prompts, jnp.full((prompts.shape[0],), 5), key)
        return tokens, lengths, jnp.sum(tokens == 0)

    tokens, lengths, _ = pipeline(m.params, la, jnp.asarray(prompts), jax.random.key(0))
    want = pj.generate(m, prompts, max_new_tokens=12, method="pass", k=2, tree="2;ngram=3", eos_token_id=())
    assert np.asarray(tokens).tolist() == want.token_ids and np.asarray(lengths).tolist() == [12, 12]


@pytest.mark.parametrize("kw, match", [
    ({"method": "pass", "tree": "ngram=4"}, "no look-ahead candidates: use method 'ngram'"),
    ({"method": "pass", "tree": "2;blocks=0"}, "no look-ahead block"),
    ({"method": "pass", "variant": "fused", "tree": "2"}, "tree= applies to"),
    ({"method": "ar", "tree": "ngram=2"}, "tree= applies to"),
    ({"method": "ngram", "tree": "2;ngram=2"}, "n-gram drafts only"),
    ({"method": "pass", "k": 1, "tree": "2,1"}, "2 look-ahead positions deep, but k=1"),
])
def test_tree_arguments_that_cannot_work_are_clear_errors(small_vocab_model, kw, match):
    with pytest.raises(ValueError, match=match):
        pj.generate(small_vocab_model, [[1, 2]], max_new_tokens=4, **kw)


def test_default_tree_fits_any_k(small_vocab_model):
    ar = pj.generate(small_vocab_model, PROMPTS, max_new_tokens=12, eos_token_id=())
    assert pj.generate(small_vocab_model, PROMPTS, max_new_tokens=12, eos_token_id=(), method="pass",
                       k=1).token_ids == ar.token_ids


def test_ngram_share_counts_the_rounds_whose_row_drafted_a_gated_chain(small_vocab_model):
    """stats.ngram_share (what `tune` prices a gated chain by) = (row, round) pairs whose history's last
    ngram_min tokens occurred earlier with a known token after them, replayed here in numpy."""
    m = small_vocab_model
    prompts = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [5, 6, 5, 6, 5], [0, 1, 2, 3, 4, 5, 6]]
    spec = DecodeSpec(METHODS["ngram"], 0, pj.Sampler(), 24, (), DraftTree.parse("ngram=3;ngram_min=2"))
    plan = DecodePlan(m.config, spec, max_len=64)
    inp, state = prefill_for_rounds(plan, m.params, jnp.zeros((0, m.config.hidden_size)), prompts)
    step = jax.jit(functools.partial(plan.spec.method.round, plan))
    expected = rounds = 0
    while not bool(state.done.all()):
        out, out_len, done = (np.asarray(a) for a in (state.out, state.out_len, state.done))
        for row, p in enumerate(prompts):
            if not done[row]:
                h = p + out[row, :out_len[row]].tolist()
                rounds += 1
                expected += any(h[j:j + 2] == h[-2:] for j in range(len(h) - 2))
        state = step(inp, state)
    assert int(state.ngram_rows) == expected and 0 < expected < rounds
    r = pj.generate(m, prompts, max_new_tokens=24, eos_token_id=(), method="ngram", tree="ngram=3;ngram_min=2",
                    pass_costs=None)
    assert r.stats.ngram_share == pytest.approx(expected / rounds)
    assert sum(r.stats.row_forward_passes) - len(prompts) == rounds  # the prefill is each row's first pass
    assert pj.generate(m, prompts, max_new_tokens=4, method="pass", k=2, tree="2").stats.ngram_share is None


def test_tune_prices_a_gated_chain_at_the_share_of_rounds_that_draft_it():
    from infer.tune import choose

    probe = DraftTree.parse("1;ngram=2;ngram_min=2")
    rates = [1.0, 0.5, 0.3, 0.1]  # root, look-ahead 1, n-gram 1, n-gram 2
    costs = {1: 0.010, 2: 0.010, 4: 0.012, 8: 0.020, 16: 0.040}
    best, table = choose(probe, rates, costs, k=4, max_nodes=8, ngram_share=1.0)
    assert best.describe() == "1;ngram=0"  # a chain on every round costs more than it accepts (1.8 / 16 ms)
    best, table = choose(probe, rates, costs, k=4, max_nodes=8, ngram_share=0.2)
    assert best.describe() == "1;ngram=1;ngram_min=2"
    row = next(r for r in table if r["tree"] == best.describe())
    assert row["tokens"] == 6 and row["expected_ms_per_pass"] == pytest.approx(0.2 * 16 + 0.8 * 12)
    assert row["expected_tokens_per_pass"] == pytest.approx(1.8)
