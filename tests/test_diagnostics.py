"""Look-ahead diagnostics on hand-built models whose next-next token is known by construction."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pass_jax as pj
from pass_jax.decoding.rounds import block_layout
from pass_jax.lookahead.diagnostics import branch_layout, diagnose, evaluate, expected_tokens, tree_widths
from pass_jax.lookahead.training import TrainLayout
from pass_jax.models.cache import KVCache
from pass_jax.models.llama import embed_tokens, forward, init_params, logits_from_hidden

from .conftest import tiny_model


def bigram_model(logits: np.ndarray) -> pj.Model:
    """A model whose output at every position is logits[its own input token] (a bigram model).

    Attention and MLP output projections are zero, so the residual stream is the input embedding; the
    embedding is the identity and the head is the logits table, so a look-ahead equal to the embedding
    of token a outputs logits[a].
    """
    v = logits.shape[0]
    cfg = pj.ModelConfig(vocab_size=v, hidden_size=v, intermediate_size=8, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=v // 2)
    params = init_params(cfg, jax.random.key(0))
    for layer in params["layers"]:
        layer["o"], layer["down"] = jnp.zeros_like(layer["o"]), jnp.zeros_like(layer["down"])
    params["embed"] = jnp.eye(v, dtype=jnp.float32)
    params["lm_head"] = jnp.asarray(logits, jnp.float32) / math.sqrt(v)  # rms_norm(e_x) = sqrt(v) e_x
    return pj.Model(cfg, params)


def test_agreement_and_tokens_per_forward_on_a_repeat_model():
    """Token x is followed by x (p .95); the rank of token v after x is (v - x) mod 16, so each look-ahead's rank
    is known."""
    v = 16
    model = bigram_model(-3.0 * ((np.arange(v)[None, :] - np.arange(v)[:, None]) % v).astype(np.float32))
    prompts = [[3, 11, 7], [5, 9]]
    cont = [[7] * 6, [9] * 6]  # greedy by construction (the targets are the model's own argmax anyway)
    la = model.params["embed"][jnp.array([7, 4, 0])]  # look-ahead i outputs logits[a_i]
    res = evaluate(model.params, model.config, la, prompts, cont, widths=(5, 5, 1), batch_size=3)
    # ranks of 7 / 9: look-ahead 1 (a=7): 0 / 2; look-ahead 2 (a=4): 3 / 5; look-ahead 3 (a=0): 7 / 9
    assert res["points"] == [10, 8, 6]
    assert res["top1"] == [0.5, 0.0, 0.0]
    assert res["top5"] == [1.0, 0.5, 0.0]
    assert res["top10"] == [1.0, 1.0, 1.0]
    assert res["ceiling"] == [1.0, 1.0]  # p(x | x) = .95: the marginal two and three tokens ahead peaks at x too
    # chain: 1 + 0.5 + 0.5*0 + 0 either way; tree (5,5,1): rank 0 then 3 -> 2 accepted, rank 2 -> 1 (joint 2.5),
    # while independence gives 1 + top5_1 + top1_1 * top5_2 + top1_1 * top1_2 * top1_3 = 1 + 1 + 0.25 + 0
    assert res["chain"] == {"widths": [1, 1, 1], "independent": 1.5, "joint": 1.5}
    assert res["tree"] == {"widths": [5, 5, 1], "independent": 2.25, "joint": 2.5}


def test_expected_tokens_follow_from_agreements():
    rng = np.random.default_rng(0)
    ranks = rng.integers(0, 4, (50, 7, 4))
    valid = np.ones(ranks.shape, bool)
    a1 = [np.mean(ranks[..., i] == 0) for i in range(4)]
    chain = expected_tokens(ranks, valid, (1, 1, 1, 1))
    assert chain["independent"] == pytest.approx(1 + sum(np.prod(a1[:i + 1]) for i in range(4)))
    lead = np.argmin(np.concatenate([ranks == 0, np.zeros((50, 7, 1), bool)], -1), -1)  # leading run of hits
    assert chain["joint"] == pytest.approx(1 + lead.mean())
    a2 = np.mean(ranks[..., 1] < 2)
    assert expected_tokens(ranks, valid, (1, 2))["independent"] == pytest.approx(1 + a1[0] + a1[0] * a2)
    assert tree_widths("3,1;ngram=4") == (3, 1)
    with pytest.raises(ValueError, match="spine"):
        tree_widths(pj.DraftTree(((0,), (1,), (1, 0))))


def test_ceiling_sees_the_marginal_not_the_greedy_path():
    """After 0: 1 (p .4), 2 or 3 (.3 each); 1 -> 5 and 2, 3 -> 6, forever. Greedy: 0 1 5 5 ..., but two
    tokens after 0 the model's marginal puts .6 on 6: no single-pass drafter matching it drafts the 5."""
    v = 8
    logits = np.full((v, v), -30.0, np.float32)
    logits[0, [1, 2, 3]] = np.log([0.4, 0.3, 0.3])
    for x, nxt in {1: 5, 2: 6, 3: 6, 4: 4, 5: 5, 6: 6, 7: 7}.items():
        logits[x, nxt] = 0.0
    model = bigram_model(logits)
    cont = [[1, 5, 5, 5, 5]]
    la = model.params["embed"][jnp.array([5, 5])]
    res = evaluate(model.params, model.config, la, [[0]], cont)
    assert res["ceiling"] == [0.75, pytest.approx(2 / 3)]  # t = 0 misses, t = 1.. hit
    assert res["top1"] == [1.0, 1.0]  # a look-ahead that always says 5 beats it
    assert evaluate(model.params, model.config, la, [[0]], cont, beam=1)["ceiling"] == [1.0, 1.0]  # greedy path only


def test_branch_layout_is_the_training_layout():
    for seq_len, k, stride in [(16, 3, 1), (20, 4, 3)]:
        layout = TrainLayout(seq_len, k, stride)
        positions, mask, _ = layout.arrays()
        pos, msk = branch_layout(seq_len, jnp.asarray(layout.points)[None], k)
        np.testing.assert_array_equal(pos[0], positions)
        np.testing.assert_array_equal(msk[0], mask)


def test_ranks_and_exact_ceiling_match_the_decoder_layout():
    """On a random model: ranks equal those of the decoder's own look-ahead block after x_0..x_t, and with a
    beam of the whole vocabulary the depth-1 ceiling is the exact marginal over x_{t+1}."""
    m = tiny_model(vocab=13, layers=1, heads=4, kv_heads=2)
    k, cfg, params, v = 3, m.config, m.params, 13
    la = pj.init_lookahead(params, k, "random")
    seq = np.random.default_rng(1).integers(0, v, 10).tolist()
    first, n = 2, 6
    out = diagnose(params, cfg, la, jnp.asarray([seq]), jnp.asarray([first]), jnp.asarray([len(seq)]), n_points=n,
                   ceiling_depth=1, beam=v)
    ranks, valid, ceiling = (np.asarray(out[name])[0] for name in ("ranks", "valid", "ceiling"))

    @jax.jit
    def probs(tokens, last, n_la):  # tokens [B, L]; a look-ahead block of n_la after token slot `last`
        b, length = tokens.shape
        pos, blk = block_layout(jnp.zeros((b,), jnp.int32), last, length, n_la.shape[0])
        embeds = jnp.concatenate([embed_tokens(params, tokens), jnp.broadcast_to(n_la, (b,) + n_la.shape)], 1)
        h, _ = forward(params, cfg, embeds, pos, blk, KVCache.create(cfg, b, embeds.shape[1]))
        return jax.nn.softmax(logits_from_hidden(params, h), -1)

    points = np.arange(first, first + n)
    p = np.asarray(probs(jnp.asarray([seq] * n), jnp.asarray(points), la))  # [N, L + k, V]
    greedy = p[0, :len(seq)].argmax(-1)  # token slots are causal: the model's token after each position
    # every point t, with x_{t+1} replaced by each candidate c: p(. | x_<=t, c) at slot t+1
    cands = np.array([seq[:t + 1] + [c] + seq[t + 2:] for t in points for c in range(v)])
    pc = np.asarray(probs(jnp.asarray(cands), jnp.full((len(cands),), len(seq) - 1), la[:0]))
    for j, t in enumerate(points):
        for i in range(1, k + 1):
            assert valid[j, i - 1] == (t + 1 + i < len(seq))
            if valid[j, i - 1]:
                la_p = p[j, len(seq) + i - 1]
                assert ranks[j, i - 1] == np.sum(la_p > la_p[greedy[t + i]])
        marginal = p[j, t] @ pc[j * v:(j + 1) * v, t + 1]  # sum_c p(c | x_<=t) p(. | x_<=t, c)
        if t + 2 < len(seq):
            assert ceiling[j, 0] == (np.argmax(marginal) == greedy[t + 1])


def test_eval_lookahead_command(tmp_path, capsys):
    from train.__main__ import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "def f(x):\\n"}\n{"prompt": "import os\\n"}\n{"prompt": "class A:\\n"}\n')
    out = tmp_path / "r.json"
    code = main(["eval-lookahead", "--lookahead", "untrained", "--k", "2", "--prompts", str(prompts),
                 "--max-new-tokens", "6", "--ceiling-depth", "1", "--beam", "2", "--tree", "2,1",
                 "--out", str(out), "--quiet"])
    assert code == 0
    table = capsys.readouterr().out
    assert "top-10" in table and "chain 1,1:" in table and "tree 2,1:" in table
    res = json.loads(out.read_text())
    assert res["k"] == 2 and res["points"] == [3 * 5, 3 * 4] and len(res["ceiling"]) == 1
    assert all(0 <= a <= b <= c <= 1 for a, b, c in zip(res["top1"], res["top5"], res["top10"]))
    assert 1 <= res["chain"]["joint"] <= 3
