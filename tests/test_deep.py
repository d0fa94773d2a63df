"""Deep look-ahead: per-layer key/value prefixes that only look-ahead positions see. Real tokens compute
exactly what they compute without them, so decoding stays lossless; the prefix trains with the embeddings."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pass_jax as pj
from pass_jax.io.checkpoint import load_lookahead
from pass_jax.lookahead.training import TrainLayout, make_train_step
from pass_jax.models.cache import KVCache
from pass_jax.models.contract import causal_block_mask
from pass_jax.models.llama import embed_tokens, forward

from .conftest import prefill_for_rounds, run_and_kill_after_checkpoint, tiny_model
from .test_train import REPO, _env, _leaf, _train_cmd, base_dir, lookahead_loss  # noqa: F401 -- base_dir: a fixture


def _deep(m, k=3, p=4, scale=3.0, seed=0):
    la = pj.init_deep(pj.init_lookahead(m.params, k, "random"), m.config, p, jax.random.key(seed))
    return la.replace(prefix=la.prefix * (scale / 0.02))  # far from zero: the prefix matters


def test_prefix_changes_only_the_rows_that_see_it():
    m = tiny_model(vocab=29, layers=2, heads=4, kv_heads=2)
    la = _deep(m)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 29, (2, 9)))
    embeds, positions = embed_tokens(m.params, tokens), jnp.broadcast_to(jnp.arange(9), (2, 9))
    mask = causal_block_mask(jnp.ones((2, 9), bool))
    rows = jnp.broadcast_to(jnp.arange(9) >= 6, (2, 9))
    plain, _ = forward(m.params, m.config, embeds, positions, mask, KVCache.create(m.config, 2, 9))
    deep, _ = forward(m.params, m.config, embeds, positions, mask, KVCache.create(m.config, 2, 9),
                      prefix=la.prefix, prefix_rows=rows)
    np.testing.assert_array_equal(deep[:, :6], plain[:, :6])  # bit for bit: verification sees what AR sees
    assert float(jnp.max(jnp.abs(deep[:, 6:] - plain[:, 6:]))) > 1e-2


def test_folded_prefix_is_one_softmax_over_prefix_and_cache():
    """The prefix joins attention by log-sum-exp weights (no cache copy): the same as attending to the P
    learned entries placed before the cache."""
    from pass_jax.backends import default_ops

    attention = default_ops().attention

    m = tiny_model(vocab=29, layers=1, heads=4, kv_heads=2)
    cfg, rng = m.config, np.random.default_rng(1)
    b, t, s, p, hd = 2, 3, 7, 4, m.config.head_dim
    q = jnp.asarray(rng.normal(size=(b, t, cfg.num_heads, hd)) * 2, jnp.float32)
    keys, values = (jnp.asarray(rng.normal(size=(b, s, cfg.num_kv_heads, hd)) * 2, jnp.float32) for _ in range(2))
    prefix = jnp.asarray(rng.normal(size=(2, p, cfg.num_kv_heads, hd)) * 2, jnp.float32)
    mask = jnp.asarray(rng.random((b, t, s)) < 0.7).at[:, :, 0].set(True)
    rows = jnp.asarray([[True, False, True], [False, True, True]])
    folded = attention(q, keys, values, mask, prefix, rows)
    both = attention(q, jnp.concatenate([jnp.broadcast_to(prefix[0], (b,) + prefix.shape[1:]), keys], 1),
                      jnp.concatenate([jnp.broadcast_to(prefix[1], (b,) + prefix.shape[1:]), values], 1),
                     jnp.concatenate([jnp.broadcast_to(rows[:, :, None], (b, t, p)), mask], 2))
    np.testing.assert_allclose(folded, both, rtol=1e-5, atol=1e-5)
    plain = attention(q, keys, values, mask)
    np.testing.assert_array_equal(np.where(rows[..., None], 0, folded), np.where(rows[..., None], 0, plain))
    assert float(jnp.max(jnp.abs(folded - plain))) > 1e-2


@pytest.mark.parametrize("variant", ["tree", "fused", "paper"])
def test_greedy_pass_with_a_deep_lookahead_is_autoregressive_decoding(variant):
    m = tiny_model(vocab=31, layers=2, heads=4, kv_heads=2, scale=0.6)
    la = _deep(m)
    prompts = [[1, 2, 3, 4, 5, 1, 2], [7, 8]]
    ar = pj.generate(m, prompts, max_new_tokens=24, eos_token_id=())
    kw = {"max_new_tokens": 24, "method": "pass", "k": 3, "variant": variant, "eos_token_id": (), "pass_costs": None}
    deep = pj.generate(m, prompts, lookahead=la, **kw)
    assert deep.token_ids == ar.token_ids
    plain = pj.generate(m, prompts, lookahead=la.embeds, **kw)
    assert deep.stats.acceptance_by_position != plain.stats.acceptance_by_position  # the prefix did draft
    if variant == "tree":  # tree verification draws the model's own token with the AR key: same seed, same output
        sampled = {"temperature": 0.9, "top_k": 8, "seed": 3}
        assert (pj.generate(m, prompts, lookahead=la, **kw, **sampled).token_ids
                == pj.generate(m, prompts, max_new_tokens=24, eos_token_id=(), **sampled).token_ids)


def test_deep_leaf_trains_and_its_two_pass_loss_is_the_one_pass_loss():
    from .test_train import _one_pass_loss

    m = tiny_model(vocab=11, layers=2, heads=4, kv_heads=2, scale=0.5)
    before = jax.tree.map(np.asarray, m.params)
    layout = TrainLayout(24, 3, 2)
    la = _deep(m, scale=0.02)
    tokens = jnp.asarray(np.tile(np.arange(12) % 11, (4, 2)))
    ones = np.ones((4, 24))
    got = float(lookahead_loss(la, m.params, m.config, tokens, layout, "ce", 0.8))
    assert got == pytest.approx(float(_one_pass_loss(la, m, tokens, layout, "ce", 0.8, ones)), rel=1e-5)
    tx = optax.adam(3e-2)
    opt_state, step = tx.init(la), make_train_step(m.config, layout, "ce", tx)
    start = np.asarray(la.prefix)  # the step donates its input buffers
    for _ in range(30):
        la, opt_state, value = step(la, opt_state, m.params, tokens)
    assert float(value) < 0.7 * got
    assert float(np.max(np.abs(np.asarray(la.prefix) - start))) > 1e-2  # the prefix learned too
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, m.params), before)


def test_deep_training_cli_resumes_bit_for_bit_and_decodes(base_dir, tmp_path):  # noqa: F811
    steps = 60
    subprocess.run(_train_cmd(base_dir, tmp_path / "straight", "--deep", "3", steps=steps), check=True, env=_env(),
                   cwd=REPO)
    out = tmp_path / "killed"
    run_and_kill_after_checkpoint(_train_cmd(base_dir, out, "--deep", "3", steps=steps), out / "checkpoints" / "10",
                                  out / "lookahead.json", env=_env(), cwd=REPO)
    subprocess.run(_train_cmd(base_dir, out, "--deep", "3", "--resume", steps=steps), check=True, env=_env(), cwd=REPO)
    a, b = _leaf(out, base_dir), _leaf(tmp_path / "straight", base_dir)
    assert isinstance(a, pj.DeepLookahead) and a.prefix.shape[2] == 3
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert json.loads((out / "lookahead.json").read_text())["deep_prefix"] == 3
    res = subprocess.run([sys.executable, "-m", "infer", "generate", "--model", base_dir, "--lookahead", str(out),
                          "--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--compare", "--json"], check=True,
                         capture_output=True, text=True, env=_env(), cwd=REPO)
    out_json = json.loads(res.stdout)
    assert out_json["token_ids"] == out_json["autoregressive"]["token_ids"]
    model = pj.load_model(base_dir)
    assert isinstance(load_lookahead(out, model, k=1), pj.DeepLookahead)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_deep_plans_prompt_pass_is_autoregressive_decodings(dtype):
    """The prompt's pass has no look-ahead rows, so a deep PaSS plan traces it without the prefix: the
    same graph as autoregressive decoding's, hence the same cache bit for bit. (Tracing the prefix
    fold for rows that never see it let XLA fuse the pass's elementwise ops differently: on
    SmolLM2-135M in bfloat16 one entry of layer 15 differed by a rounding, and two of six chat
    answers left autoregressive decoding 36-43 tokens later.)"""
    m = tiny_model(vocab=64, hidden=576, layers=4, heads=9, kv_heads=3, scale=0.3)
    m = pj.Model(m.config, jax.tree.map(lambda x: x.astype(dtype), m.params))
    la = _deep(m, k=4)
    prompts = [list(np.random.default_rng(1).integers(0, 64, 13))]
    ar_plan, _ = pj.make_plan(m, prompt_len=16, max_new_tokens=8)
    pass_plan, leaf = pj.make_plan(m, prompt_len=16, max_new_tokens=8, method="pass", k=4, lookahead=la, tree="2")
    assert pass_plan.max_len == ar_plan.max_len  # the same buffer: only the graphs could differ
    _, ar = prefill_for_rounds(ar_plan, m.params, None, prompts)
    _, deep = prefill_for_rounds(pass_plan, m.params, leaf, prompts)
    for a, d in zip(ar.cache.keys + ar.cache.values, deep.cache.keys + deep.cache.values):
        np.testing.assert_array_equal(np.asarray(a[:, :13], np.float32), np.asarray(d[:, :13], np.float32))
