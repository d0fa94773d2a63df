"""Hugging Face directories: save -> load round trips, sharded weights, transformers reads what we write."""

from pathlib import Path

import jax
import numpy as np
import torch

import pass_jax as pj


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
                                      for x, y in zip(la, lb))


def test_save_load_round_trip_is_bit_exact(hf_dirs, tmp_path):
    for kind in ("llama", "llama3", "qwen2", "qwen3", "gemma3"):
        m = pj.load_model(hf_dirs[kind][1])
        pj.save_model(m, tmp_path / kind)
        again = pj.load_model(tmp_path / kind)
        assert again.config == m.config
        assert jax.tree.structure(again.params) == jax.tree.structure(m.params)
        assert _leaves_equal(again.params, m.params)


def test_bfloat16_round_trip_is_bit_exact(hf_dirs, tmp_path):
    m = pj.load_model(hf_dirs["llama"][1], dtype="bfloat16")
    assert m.dtype == "bfloat16"
    pj.save_model(m, tmp_path / "bf16")
    again = pj.load_model(tmp_path / "bf16", dtype="bfloat16")
    assert _leaves_equal(again.params, m.params)


def test_sharded_checkpoint_loads_and_transformers_reads_it(hf_dirs, tmp_path):
    ref_model, path = hf_dirs["qwen2"]
    m = pj.load_model(path)
    pj.save_model(m, tmp_path / "sharded", max_shard_bytes=40_000)
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    again = pj.load_model(tmp_path / "sharded")
    assert _leaves_equal(again.params, m.params)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", attn_implementation="eager").eval()
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(ids).logits.numpy(), ref_model(ids).logits.numpy())


def test_model_written_from_config_loads_in_transformers(tmp_path):
    """Params we create ourselves (pretraining) save to a directory transformers runs identically."""
    from transformers import AutoModelForCausalLM

    from pass_jax.models.cache import KVCache
    from pass_jax.models.contract import causal_block_mask
    from pass_jax.models.llama import embed_tokens, forward, init_params, logits_from_hidden

    cfg = pj.ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
    params = init_params(cfg, jax.random.key(1), scale=0.2)
    pj.save_model(pj.Model(cfg, params), tmp_path / "own")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "own").eval()
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    hidden, _ = forward(params, cfg, embed_tokens(params, ids), np.arange(8)[None],
                        causal_block_mask(np.ones((1, 8), bool)), KVCache.create(cfg, 1, 8))
    with torch.no_grad():
        expected = ref(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(logits_from_hidden(params, hidden)) - expected).max() < 1e-4


def test_config_details_follow_transformers(hf_dirs, tmp_path):
    import json

    cfg = json.loads((Path(hf_dirs["mistral"][1]) / "config.json").read_text())
    del cfg["sliding_window"]
    assert pj.ModelConfig.from_hf_dict(cfg).sliding_window == 4096  # MistralConfig's default
    qwen = json.loads((Path(hf_dirs["qwen2"][1]) / "config.json").read_text())
    assert pj.ModelConfig.from_hf_dict({**qwen, "attention_bias": False}).attention_bias  # Qwen2 always has them
    m = pj.load_model(hf_dirs["llama"][1])
    pj.save_model(m, tmp_path / "gen")
    (tmp_path / "gen" / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert set(pj.load_model(tmp_path / "gen").config.eos_token_ids) == {5, 7}


def test_numpy_inputs_and_large_top_k(hf_dirs):
    m = pj.load_model(hf_dirs["llama"][1])
    prompt = np.array([3, 4, 5])
    a = pj.generate(m, prompt, max_new_tokens=4, method="pass", k=np.int64(2), eos_token_id=())
    b = pj.generate(m, [[3, 4, 5]], max_new_tokens=4, eos_token_id=())
    assert a.token_ids == b.token_ids
    full = pj.generate(m, [[3, 4, 5]], max_new_tokens=4, temperature=1.0, top_k=10_000, seed=1, eos_token_id=())
    assert full.token_ids == pj.generate(m, [[3, 4, 5]], max_new_tokens=4, temperature=1.0, seed=1,
                                         eos_token_id=()).token_ids
