"""The JAX model against the transformers PyTorch reference, on tiny random checkpoints."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pass_jax as pj
from pass_jax.models.cache import KVCache
from pass_jax.models.contract import causal_block_mask

from .conftest import ARCHS

TOL = 1e-4


@functools.partial(jax.jit, static_argnums=1)
def _block(params, cfg, tokens, positions, cache):
    """One causal block through the decoder, jitted as decoding runs it: (logits, cache with it written)."""
    mask = causal_block_mask(jnp.ones(tokens.shape, bool))
    hidden, cache = cfg.forward(params, cfg.embed(params, tokens), positions, mask, cache)
    return cfg.logits(params, hidden), cache


def _ref_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()


def _run_chunks(m, ids, chunks):
    """Feed ids [B, T] through the cache chunk by chunk; return the logits of every position."""
    b, t = ids.shape
    cache = KVCache.create(m.config, b, t + 8)
    outs, start = [], 0
    for n in chunks:
        block = jnp.asarray(ids[:, start:start + n])
        positions = jnp.broadcast_to(jnp.arange(start, start + n)[None], (b, n))
        logits, cache = _block(m.params, m.config, block, positions, cache)
        cache = cache.commit(jnp.full((b,), n))
        outs.append(np.asarray(logits))
        start += n
    assert start == t
    return np.concatenate(outs, 1)


@pytest.mark.parametrize("kind", list(ARCHS))
def test_full_prompt_and_incremental_logits_match_transformers(hf_dirs, kind):
    ref_model, path = hf_dirs[kind]
    m = pj.load_model(path)
    ids = np.random.default_rng(0).integers(0, m.config.vocab_size, (2, 20))
    ref = _ref_logits(ref_model, ids)
    full = _run_chunks(m, ids, [20])
    incremental = _run_chunks(m, ids, [7, 1, 1, 3, 1, 5, 1, 1])
    assert np.abs(full - ref).max() <= TOL
    assert np.abs(incremental - ref).max() <= TOL


def test_stale_cache_entries_past_length_are_invisible(hf_dirs):
    """Garbage written past a row's length (rejected drafts) must not change later logits."""
    _, path = hf_dirs["llama"]
    m = pj.load_model(path)
    ids = np.random.default_rng(1).integers(0, m.config.vocab_size, (1, 10))
    clean = _run_chunks(m, ids, [6, 4])
    cache = KVCache.create(m.config, 1, 18)
    junk = jnp.asarray(np.random.default_rng(2).integers(0, m.config.vocab_size, (1, 8)))
    _, cache = _block(m.params, m.config, jnp.asarray(ids[:, :6]), jnp.arange(6)[None], cache)
    cache = cache.commit(jnp.array([6]))
    _, cache = _block(m.params, m.config, junk, jnp.arange(6, 14)[None], cache)  # written, never committed
    logits, _ = _block(m.params, m.config, jnp.asarray(ids[:, 6:]), jnp.arange(6, 10)[None], cache)
    np.testing.assert_allclose(np.asarray(logits), clean[:, 6:], atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "qwen3", "gemma3"])
def test_greedy_generation_matches_transformers_generate(hf_dirs, kind):
    ref_model, path = hf_dirs[kind]
    m = pj.load_model(path)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, m.config.vocab_size, n).tolist() for n in (3, 11, 6)]
    ours = pj.generate(m, prompts, max_new_tokens=32, eos_token_id=())
    for prompt, got in zip(prompts, ours.token_ids):
        with torch.no_grad():
            ref = ref_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)
        assert got == ref[0, len(prompt):].tolist()
    assert ours.stats.new_tokens == 96
    assert ours.stats.forward_passes == 32
