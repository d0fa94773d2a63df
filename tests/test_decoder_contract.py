"""A model of the user's own, written in Flax NNX against pass-jax's attention/cache primitive, decodes
with every method and stays lossless: what `pass_jax.models.contract.Decoder` promises.

The model is deliberately not a Llama: LayerNorm-free scaling, a GELU MLP, a tied head, its own layout.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pass_jax as pj
from pass_jax.backends import resolve
from pass_jax.models.contract import Decoder, attend_cached, pass_mask

V, D, HEADS, KV, HD, F, LAYERS = 24, 32, 4, 2, 8, 64, 2
INV_FREQ = 1.0 / (10000.0 ** (np.arange(0, HD, 2) / HD))


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm1, self.norm2 = nnx.RMSNorm(D, rngs=rngs), nnx.RMSNorm(D, rngs=rngs)
        self.qkv = nnx.Linear(D, (HEADS + 2 * KV) * HD, use_bias=False, rngs=rngs)
        self.o = nnx.Linear(HEADS * HD, D, use_bias=False, rngs=rngs)
        self.up, self.down = nnx.Linear(D, F, rngs=rngs), nnx.Linear(F, D, rngs=rngs)

    def __call__(self, x, keys, values, lengths, positions, mask, prefix, prefix_rows, local_blocks, ops):
        b, t = x.shape[:2]
        heads = ops.rope(self.qkv(self.norm1(x)).reshape(b, t, HEADS + 2 * KV, HD), positions, INV_FREQ, HEADS + KV)
        q, k, v = heads[:, :, :HEADS], heads[:, :, HEADS:HEADS + KV], heads[:, :, HEADS + KV:]
        out, keys, values = attend_cached(ops, q, k, v, keys, values, lengths, mask, prefix, prefix_rows, local_blocks)
        x = x + self.o(out)
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x)))), keys, values


class TinyLM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(V, D, embedding_init=nnx.initializers.normal(0.3), rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(LAYERS)])
        self.norm = nnx.RMSNorm(D, rngs=rngs)

    def __call__(self, embeds, positions, block_mask, cache, visible, prefix, prefix_rows, local_blocks, ops):
        mask = pass_mask(cache, block_mask, positions, visible)
        x, keys, values = embeds, list(cache.keys), list(cache.values)
        for i, block in enumerate(self.blocks):
            x, keys[i], values[i] = block(x, keys[i], values[i], cache.lengths, positions, mask,
                                          None if prefix is None else prefix[i], prefix_rows, local_blocks, ops)
        return self.norm(x), cache.replace(keys=tuple(keys), values=tuple(values))


@dataclasses.dataclass(frozen=True)
class NnxDecoder:
    """The contract around an NNX module: its graph is static (hashable), its state is the params."""

    graphdef: Any
    vocab_size: int = V
    hidden_size: int = D
    num_layers: int = LAYERS
    num_kv_heads: int = KV
    head_dim: int = HD
    max_position_embeddings: int = 256
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    architecture: str = "TinyLM"

    def embed(self, params, tokens, ops=None):
        return nnx.merge(self.graphdef, params).embed(tokens).astype(jnp.float32)

    def forward(self, params, embeds, positions, block_mask, cache, *, visible=None, prefix=None, prefix_rows=None,
                local_blocks=None, ops=None):
        return nnx.merge(self.graphdef, params)(embeds, positions, block_mask, cache, visible, prefix, prefix_rows,
                                                local_blocks, resolve(ops))

    def logits(self, params, hidden, ops=None):
        return nnx.merge(self.graphdef, params).embed.attend(hidden).astype(jnp.float32)


@pytest.fixture(scope="module")
def model():
    graphdef, state = nnx.split(TinyLM(nnx.Rngs(0)))
    return pj.Model(NnxDecoder(graphdef), state)


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, V, n).tolist() for n in (5, 9)] + [[3, 7, 1, 3, 7, 1, 3, 7]]


def test_the_nnx_model_is_a_decoder(model):
    assert isinstance(model.config, Decoder) and model.dtype == jnp.float32
    hash(model.config)  # static under jit: the plan's key


@pytest.mark.parametrize("method, extra", [("pass", {"variant": "tree"}), ("pass", {"variant": "fused"}),
                                           ("pass", {"variant": "paper"}), ("ngram", {})])
def test_every_method_gives_the_autoregressive_tokens(model, method, extra):
    ar = pj.generate(model, _prompts(), max_new_tokens=24, eos_token_id=())
    got = pj.generate(model, _prompts(), max_new_tokens=24, eos_token_id=(), method=method, **extra)
    assert got.token_ids == ar.token_ids
    assert got.stats.tokens_per_forward > 1  # drafts were accepted: the verify and rollback paths ran


def test_a_deep_lookahead_and_sampling_through_the_contract(model):
    """The deep leaf's prefix reaches the model through attend_cached; a tree samples with AR's keys."""
    lookahead = pj.init_deep(pj.untrained_lookahead(model, 4), model.config, 2, jax.random.key(1))
    ar = pj.generate(model, _prompts(), max_new_tokens=16, eos_token_id=())
    assert pj.generate(model, _prompts(), max_new_tokens=16, eos_token_id=(), method="pass",
                       lookahead=lookahead).token_ids == ar.token_ids
    sampled = {"max_new_tokens": 16, "eos_token_id": (), "temperature": 1.0, "seed": 3}
    assert pj.generate(model, _prompts(), method="pass", **sampled).token_ids == \
        pj.generate(model, _prompts(), **sampled).token_ids
