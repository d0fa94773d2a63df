"""bfloat16: greedy PaSS may leave autoregressive decoding only where float32 logits nearly tie.

A multi-row pass accumulates bfloat16 products in another order than a one-row pass, so where the
top two logits are within rounding of each other the argmax can flip. Everywhere else the outputs
must agree; this test finds the first divergence of every row and checks the float32 gap there.
"""

import jax
import jax.numpy as jnp
import numpy as np

import pass_jax as pj
from pass_jax.models.cache import KVCache
from pass_jax.models.contract import causal_block_mask
from pass_jax.models.llama import embed_tokens, forward, logits_from_hidden

from .conftest import tiny_model

NEAR_TIE = 0.05  # float32 top-two gap that bfloat16 rounding of a pass can bridge on this model


def top_two_gap(m32, ids) -> float:
    """float32 gap between the two largest next-token logits after `ids`."""
    x = jnp.asarray([ids])
    t = x.shape[1]
    hidden, _ = forward(m32.params, m32.config, embed_tokens(m32.params, x), jnp.arange(t)[None],
                        causal_block_mask(jnp.ones((1, t), bool)), KVCache.create(m32.config, 1, t))
    top = jax.lax.top_k(logits_from_hidden(m32.params, hidden[0, -1]), 2)[0]
    return float(top[0] - top[1])


def divergence_gaps(m32, prompts, a, b) -> list[float]:
    """For each row whose outputs differ: the float32 top-two gap at the first differing token."""
    gaps = []
    for p, x, y in zip(prompts, a, b):
        j = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None)
        if j is not None:
            gaps.append(top_two_gap(m32, p + x[:j]))
    return gaps


def test_bfloat16_tree_diverges_from_autoregressive_only_at_float32_near_ties():
    m = tiny_model(vocab=64, hidden=64, layers=2, heads=4, kv_heads=2, seed=1, scale=0.3)
    m16 = pj.Model(m.config, jax.tree.map(lambda w: w.astype(jnp.bfloat16), m.params))
    m32 = pj.Model(m.config, jax.tree.map(lambda w: w.astype(jnp.float32), m16.params))  # the same weights
    prompts = np.random.default_rng(0).integers(0, 64, (24, 6)).tolist()
    prompts = [p + p[:3] for p in prompts]  # repeats give the n-gram branch drafts to accept
    ar = pj.generate(m16, prompts, max_new_tokens=24, eos_token_id=()).token_ids
    la = pj.init_lookahead(m16.params, 2, "random", key=jax.random.key(0))
    tree = pj.generate(m16, prompts, max_new_tokens=24, eos_token_id=(), method="pass", variant="tree", k=2,
                       lookahead=la, tree="3,1;ngram=3", pass_costs=None)
    assert tree.stats.tokens_per_forward > 1.1, "drafts must be accepted for multi-row passes to matter"
    gaps = divergence_gaps(m32, prompts, ar, tree.token_ids)
    assert all(g < NEAR_TIE for g in gaps), f"bfloat16 divergence away from a near-tie: gaps {gaps}"
    # the check has teeth: a flipped token where the float32 logits do not tie is flagged
    j = next(j for j in range(24) if top_two_gap(m32, prompts[0] + ar[0][:j]) >= NEAR_TIE)
    wrong = ar[0][:j] + [(ar[0][j] + 1) % 64]
    assert divergence_gaps(m32, prompts[:1], ar[:1], [wrong])[0] >= NEAR_TIE
