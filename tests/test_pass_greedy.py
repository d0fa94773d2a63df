"""PaSS greedy decoding is token-identical to autoregressive greedy decoding."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pass_jax as pj
from pass_jax.backends import default_ops
from pass_jax.decoding.methods import METHODS
from pass_jax.decoding.rounds import _round
from pass_jax.decoding.spec import DecodePlan, DecodeSpec

from .conftest import prefill_for_rounds, tiny_model

# bit-for-bit arithmetic across pass sizes is the CPU kernels' guarantee: XLA's ops do not give it (README, Precision)
needs_kernels = pytest.mark.skipif(default_ops().name != "cpu", reason="CPU kernels not built here")

PROMPTS = [[1, 2, 3], [4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 1], [2], [6, 6, 6, 6, 6, 1]]


def _eos_inside_budget(model, prompts, budget):
    """A token that autoregressive decoding emits mid-way through row 0: EOS must stop rows there."""
    ar = pj.generate(model, prompts, max_new_tokens=budget, eos_token_id=())
    return ar.token_ids[0][budget // 3]


@pytest.fixture(scope="module")
def small_vocab_model():
    # 7 tokens: random drafts are often right, so acceptances, partial and full, happen all the time
    return tiny_model(vocab=7, hidden=32, layers=2, heads=4, kv_heads=2, scale=0.6)


@pytest.mark.parametrize("k", [1, 2, 4, 6, 8])
@pytest.mark.parametrize("variant", ["fused", "paper"])
def test_greedy_pass_equals_autoregressive(small_vocab_model, k, variant):
    m = small_vocab_model
    eos = _eos_inside_budget(m, PROMPTS, 40)
    ar = pj.generate(m, PROMPTS, max_new_tokens=40, eos_token_id=eos)
    assert any(len(t) < 40 for t in ar.token_ids), "EOS should stop some row inside the budget"
    accepted = 0.0
    for how in ("token", "random"):
        la = pj.init_lookahead(m.params, k, how, token_id=3, key=jax.random.key(k))
        ps = pj.generate(
            m, PROMPTS, max_new_tokens=40, eos_token_id=eos, method="pass", k=k, lookahead=la, variant=variant
        )
        assert ps.token_ids == ar.token_ids
        passes = ps.stats.row_forward_passes
        assert all(p <= len(t) for p, t in zip(passes, ps.token_ids)), "more passes than tokens"
        accepted = max(accepted, *ps.stats.acceptance_by_position)
    assert accepted > 0, "the test should exercise accepted drafts"


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
def test_greedy_pass_and_ngram_equal_autoregressive_on_the_other_architectures(hf_dirs, kind):
    """Qwen3 and Gemma 3 through the same decoder contract: every method gives the AR tokens (Gemma's
    sliding window of 6 is shorter than these requests)."""
    m = pj.load_model(hf_dirs[kind][1])
    prompts = [[5, 17, 3, 5, 17, 3], list(range(20, 34)), [9]]
    ar = pj.generate(m, prompts, max_new_tokens=24, eos_token_id=())
    for method, extra in (("pass", {}), ("pass", {"variant": "fused", "k": 3}), ("ngram", {})):
        assert pj.generate(m, prompts, max_new_tokens=24, eos_token_id=(), method=method,
                           **extra).token_ids == ar.token_ids, (method, extra)


def test_greedy_pass_equals_autoregressive_on_hf_checkpoint(hf_dirs):
    m = pj.load_model(hf_dirs["mistral"][1])  # sliding window 8 < sequence lengths
    prompts = [[5, 17, 3], list(range(20, 34)), [9]]
    ar = pj.generate(m, prompts, max_new_tokens=24, eos_token_id=())
    for k in (2, 6):
        assert pj.generate(m, prompts, max_new_tokens=24, eos_token_id=(), method="pass", k=k).token_ids == ar.token_ids


@given(
    vocab=st.integers(3, 40),
    layers=st.integers(1, 2),
    kv_heads=st.sampled_from([1, 2, 4]),
    k=st.integers(1, 8),
    variant=st.sampled_from(["fused", "paper"]),
    seed=st.integers(0, 2**16),
    prompts=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=12), min_size=1, max_size=3),
    budget=st.integers(1, 24),
)
def test_property_greedy_pass_is_lossless(vocab, layers, kv_heads, k, variant, seed, prompts, budget):
    m = tiny_model(vocab=vocab, hidden=32, layers=layers, heads=4, kv_heads=kv_heads, seed=seed, scale=0.7)
    la = pj.init_lookahead(m.params, k, "random", key=jax.random.key(seed))
    ar = pj.generate(m, prompts, max_new_tokens=budget, eos_token_id=())
    ps = pj.generate(
        m, prompts, max_new_tokens=budget, eos_token_id=(), method="pass", k=k, lookahead=la, variant=variant
    )
    assert ps.token_ids == ar.token_ids
    assert all(len(t) == budget for t in ps.token_ids)


def test_cache_lengths_after_every_round(small_vocab_model):
    """Drive the fused loop round by round: committed entries = prompt + emitted - 1 (the pending token)."""
    m, k = small_vocab_model, 4
    prompts = [[1, 2, 3], [4, 5, 6, 0, 1, 2, 3]]
    ar = pj.generate(m, prompts, max_new_tokens=30, eos_token_id=()).token_ids
    spec = DecodeSpec(METHODS["pass/fused"], k, pj.Sampler(), 30, ())
    plan = DecodePlan(m.config, spec, max_len=64)
    la = pj.init_lookahead(m.params, k, "random", key=jax.random.key(0))
    inp, state = prefill_for_rounds(plan, m.params, la, prompts)
    lens = inp.prompt_lens
    rounds = {flags: jax.jit(functools.partial(_round, plan, use_drafts=flags[0], use_la=flags[1]))
              for flags in [(True, True), (False, True)]}
    seen_partial = False
    while not bool(state.done.all()):
        before = np.asarray(state.out_len)
        flags = (True, True) if bool((state.n_drafts > 0).any()) else (False, True)
        state = rounds[flags](inp, state)
        out_len, lengths = np.asarray(state.out_len), np.asarray(state.cache.lengths)
        np.testing.assert_array_equal(lengths, np.asarray(lens) + out_len - 1)
        for row in range(2):
            assert np.asarray(state.out)[row, : out_len[row]].tolist() == ar[row][: out_len[row]]
            gained = out_len[row] - before[row]
            seen_partial |= 1 < gained < k + 1
    assert seen_partial, "the test should see rounds that accepted some but not all drafts"


def test_rows_do_not_depend_on_each_other():
    m = tiny_model(vocab=9, scale=0.6)
    la = pj.init_lookahead(m.params, 3, "random", key=jax.random.key(1))
    for temperature in (0.0, 1.0):
        kw = {
            "max_new_tokens": 20,
            "eos_token_id": (4,),
            "method": "pass",
            "k": 3,
            "lookahead": la,
            "temperature": temperature,
            "seed": 5,
        }
        a = pj.generate(m, [[1, 2], [3, 3, 3, 3, 3, 3, 3], [5]], **kw).token_ids
        b = pj.generate(m, [[1, 2], [8], [5, 6, 7, 8, 0, 1, 2, 3]], **kw).token_ids
        assert a[0] == b[0]


def _constant_model(vocab=11):
    """A model whose every output is the same distribution: look-ahead drafts are always right."""
    m = tiny_model(vocab=vocab, layers=2)
    params = jax.tree.map(lambda x: x, m.params)
    params["embed"] = jnp.tile(params["embed"][:1], (vocab, 1))
    for layer in params["layers"]:
        layer["o"] = jnp.zeros_like(layer["o"])
        layer["down"] = jnp.zeros_like(layer["down"])
    return pj.Model(m.config, params)


def _ceiling_passes(variant, k, n):
    """Forward passes to emit n tokens when every draft is accepted."""
    passes, tokens = 1, 1  # the prefill drafts and emits one token
    while tokens < n:
        passes += 1
        tokens += k + 1  # a verification pass accepts all k drafts plus one
        if variant == "paper" and tokens < n:
            passes += 1
            tokens += 1  # the paper's drafting pass emits one token
    return passes


@pytest.mark.parametrize("variant", ["fused", "paper"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_perfect_drafts_reach_the_ceiling(variant, k):
    m = _constant_model()
    r = pj.generate(m, [[1, 2, 3], [4]], max_new_tokens=40, eos_token_id=(), method="pass", k=k, variant=variant)
    assert r.token_ids == pj.generate(m, [[1, 2, 3], [4]], max_new_tokens=40, eos_token_id=()).token_ids
    assert r.stats.row_forward_passes == [_ceiling_passes(variant, k, 40)] * 2
    assert r.stats.acceptance_by_position == [1.0] * k
    per_round = k + 1 if variant == "fused" else (k + 2) / 2
    assert r.stats.tokens_per_forward == pytest.approx(per_round, rel=0.25)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_equals_autoregressive(small_vocab_model, k):
    m = small_vocab_model
    noise = tiny_model(vocab=7, hidden=32, layers=2, heads=4, kv_heads=2, seed=3, scale=0.6)
    draft = pj.Model(m.config, jax.tree.map(lambda a, b: a + b, m.params, noise.params))  # a related, worse model
    eos = _eos_inside_budget(m, PROMPTS, 40)
    ar = pj.generate(m, PROMPTS, max_new_tokens=40, eos_token_id=eos)
    sp = pj.generate(m, PROMPTS, max_new_tokens=40, eos_token_id=eos, method="speculative", k=k, draft_model=draft)
    assert sp.token_ids == ar.token_ids
    assert max(sp.stats.acceptance_by_position) > 0
    # the target itself as draft model: every draft is accepted, k + 1 tokens per target pass
    own = pj.generate(m, PROMPTS, max_new_tokens=40, eos_token_id=(), method="speculative", k=k, draft_model=m)
    assert own.token_ids == pj.generate(m, PROMPTS, max_new_tokens=40, eos_token_id=()).token_ids
    assert own.stats.acceptance_by_position == [1.0] * k


@pytest.mark.parametrize("tp", [62, 70])
def test_prompt_pass_is_autoregressive_decodings_whatever_the_lookahead(tp):
    """Bit for bit: the prompt's cache entries and first token after a PaSS prefill equal AR's: for a
    prompt of 62 slots whose pass with a 4-token look-ahead block would cross the CPU kernels' 64-row
    limit (the block runs as a pass of its own), and for a 70-slot prompt with a longer cache buffer
    (attention does not depend on the buffer's length)."""
    from pass_jax.decoding.rounds import _prefill
    from pass_jax.decoding.spec import Inputs

    m, k = tiny_model(vocab=50, hidden=64, layers=2, heads=2, kv_heads=1, seed=3), 4
    prompts = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, tp)))
    lens = jnp.asarray([tp, 40])
    la = pj.init_lookahead(m.params, k, "random", key=jax.random.key(0))
    states = {}
    for method, lookahead, max_len in (("ar", None, 96), ("pass", la, 160)):
        plan = DecodePlan(m.config, DecodeSpec(METHODS["pass/fused" if method == "pass" else method], k, pj.Sampler(), 8, ()), max_len=max_len)
        inp = Inputs(m.params, lookahead, prompts, lens, jnp.zeros((2, 2), jnp.uint32))
        states[method] = jax.jit(functools.partial(_prefill, plan))(inp)
    ar, ps = states["ar"], states["pass"]
    np.testing.assert_array_equal(np.asarray(ps.pending), np.asarray(ar.pending))
    for a, p in zip(ar.cache.keys + ar.cache.values, ps.cache.keys + ps.cache.values):
        for row, n in enumerate(np.asarray(lens)):
            np.testing.assert_array_equal(np.asarray(p[row, :n]), np.asarray(a[row, :n]))


@needs_kernels
def test_every_round_takes_the_cpu_kernels_whatever_its_size():
    """A tree pass of more than 64 tokens still computes each token as a 1-token step does (the CPU
    kernels, where they are built), and its greedy output is autoregressive decoding's."""
    from pass_jax.backends.cpu import ffi as cpu_kernel

    m, k = tiny_model(vocab=50, hidden=64, layers=2, heads=2, kv_heads=1, seed=4), 4
    la = pj.init_lookahead(m.params, k, "random", key=jax.random.key(1))
    tree = "8,4,2,1;ngram=4"
    n = pj.DraftTree.parse(tree).num_tokens(k)
    assert n > cpu_kernel.MAX_ROWS
    plan, leaf = pj.make_plan(m, prompt_len=16, max_new_tokens=20, method="pass", k=k, lookahead=la, tree=tree)
    text = jax.jit(plan).lower(m.params, leaf, jnp.zeros((2, 16), jnp.int32), jnp.asarray([4, 3]),
                               jax.random.key(0)).compile().as_text()
    products = re.findall(r'f32\[(\d+),\d+\]\{[^}]*\} custom-call\([^)]*\), custom_call_target="pass_jax_dense"', text)
    assert max(map(int, products)) >= 2 * n  # both rows' tree passes, every node: the kernel's product
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    got = pj.generate(m, prompts, max_new_tokens=20, method="pass", k=k, lookahead=la, tree=tree, eos_token_id=())
    ar = pj.generate(m, prompts, max_new_tokens=20, eos_token_id=())
    assert got.token_ids == ar.token_ids


@needs_kernels
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_block_computes_each_token_as_1_token_steps_do(dtype):
    """Bit for bit, jitted: the hidden states of a 2- and a 5-token block equal 1-token steps (SmolLM2's
    width: there XLA's own reduce summed a row of the RMS norm in a row-count-dependent order, and
    XLA fused RoPE into q's and k's consumers differently by pass size; with XLA's RoPE this test
    fails in float32, by ~4e-6)."""
    from pass_jax.models import llama as M
    from pass_jax.models.cache import KVCache
    from pass_jax.models.contract import causal_block_mask

    m = tiny_model(vocab=64, hidden=576, layers=2, heads=9, kv_heads=3, seed=5, scale=0.05)
    params, cfg = jax.tree.map(lambda a: a.astype(dtype), m.params), m.config
    ops = default_ops().for_rounds()  # as the decode loop's rounds run
    fwd = jax.jit(lambda p, t, pos, c: M.forward(p, cfg, M.embed_tokens(p, t, ops), pos, causal_block_mask(t >= 0),
                                                 c, ops=ops))
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 20)))
    _, cache = fwd(params, prompt, jnp.arange(20)[None], KVCache.create(cfg, 1, 64, dtype))
    cache = cache.commit(jnp.asarray([20]))
    tokens = [7, 11, 3, 60, 29]
    steps, c = [], cache
    for i, tok in enumerate(tokens):
        h, c = fwd(params, jnp.asarray([[tok]]), jnp.asarray([[20 + i]]), c)
        c = c.commit(jnp.asarray([1]))
        steps.append(np.asarray(h)[0, 0])
    for t in (2, 5):
        block, _ = fwd(params, jnp.asarray([tokens[:t]]), jnp.arange(20, 20 + t)[None], cache)
        np.testing.assert_array_equal(np.asarray(block)[0], np.stack(steps[:t]))
