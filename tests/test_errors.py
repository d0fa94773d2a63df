"""Bad input gets a clear error before any compute, never a silent wrong answer or an XLA trace."""

import json
from pathlib import Path

import pytest

import pass_jax as pj

from .conftest import tiny_model


def test_missing_directory(tmp_path):
    with pytest.raises(pj.ConfigError, match="does not exist"):
        pj.load_model(tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(pj.ConfigError, match="no config.json"):
        pj.load_model(tmp_path)


def test_garbled_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(pj.ConfigError, match="not valid JSON"):
        pj.load_model(tmp_path)


def test_config_missing_fields(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 10}))
    with pytest.raises(pj.ConfigError, match="lacks required fields: hidden_size"):
        pj.load_model(tmp_path)


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "GemmaForCausalLM"])
def test_unknown_architecture(tmp_path, arch):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [arch], "vocab_size": 10}))
    with pytest.raises(pj.ConfigError, match=f"unsupported architecture '{arch}'"):
        pj.load_model(tmp_path)


@pytest.mark.parametrize(
    "feature,msg",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
    ],
)
def test_unsupported_config_feature(hf_dirs, tmp_path, feature, msg):
    cfg = json.loads(Path(hf_dirs["llama"][1], "config.json").read_text())
    cfg.update(feature)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(pj.ConfigError, match=msg):
        pj.load_model(tmp_path)


def test_missing_or_corrupt_weights(hf_dirs, tmp_path):
    cfg = Path(hf_dirs["llama"][1], "config.json").read_text()
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(pj.ConfigError, match="lacks weight file model.safetensors"):
        pj.load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(pj.ConfigError, match="cannot read"):
        pj.load_model(tmp_path)


def test_prompt_longer_than_cache():
    m = tiny_model()
    with pytest.raises(pj.CacheOverflowError, match="KV cache holds 32 entries"):
        pj.generate(m, [list(range(30))], max_new_tokens=4, max_len=32)


def test_max_new_tokens_overflowing_cache():
    m = tiny_model()
    with pytest.raises(pj.CacheOverflowError, match="max_new_tokens 100"):
        pj.generate(m, [[1, 2, 3]], max_new_tokens=100, max_len=64)
    with pytest.raises(pj.CacheOverflowError):  # PaSS needs room for its draft and look-ahead block too
        pj.generate(m, [[1, 2, 3]], max_new_tokens=40, max_len=48, method="pass", k=8)


@pytest.mark.parametrize(
    "bad,msg",
    [([[]], "empty prompt"), ([], "no prompts"), ([[1, 99]], "outside the vocabulary"), ("text", "no tokenizer")],
)
def test_bad_prompts(bad, msg):
    with pytest.raises(ValueError, match=msg):
        pj.generate(tiny_model(), bad, max_new_tokens=2)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"method": "pass", "k": 0}, "1..16"),
        ({"method": "pass", "k": 17}, "1..16"),
        ({"method": "beam"}, "method"),
        ({"max_new_tokens": 0}, "positive"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"method": "pass", "k": 2, "lookahead": [[0.0] * 5] * 2}, "shape"),
    ],
)
def test_bad_generation_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        pj.generate(tiny_model(), [[1, 2]], **kwargs)


def test_request_past_max_position_embeddings():
    import dataclasses
    import warnings

    m = tiny_model()
    m = pj.Model(dataclasses.replace(m.config, max_position_embeddings=32), m.params)
    assert len(pj.generate(m, [[1, 2, 3]], max_new_tokens=29).token_ids[0]) == 29  # 3 + 29 = 32 positions fit
    with pytest.raises(ValueError, match="reaches position 33 .* max_position_embeddings 32.*allow_long"):
        pj.generate(m, [[1, 2, 3]], max_new_tokens=30)
    with pytest.raises(ValueError, match="reaches position 33 .* max_position_embeddings 32"):  # every method alike
        pj.generate(m, [[1, 2, 3]], max_new_tokens=30, method="pass", k=8, variant="fused")
    with pytest.warns(UserWarning, match="max_position_embeddings 32"):
        r = pj.generate(m, [[1, 2, 3]], max_new_tokens=40, allow_long=True)
    assert len(r.token_ids[0]) == 40
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pj.generate(m, [[1, 2, 3]], max_new_tokens=8)  # within bounds: silent


@pytest.mark.parametrize("method, variant, k", [("pass", "tree", 4), ("pass", "fused", 8), ("pass", "paper", 4),
                                                ("ngram", "tree", 4), ("speculative", "tree", 3)])
def test_every_method_takes_a_request_that_fills_the_context(method, variant, k):
    """A draft block may reach past the last position near the end of a request: PaSS, n-gram and
    speculative decoding take every request autoregressive decoding takes, and emit the same tokens."""
    import dataclasses

    m = tiny_model()
    m = pj.Model(dataclasses.replace(m.config, max_position_embeddings=24), m.params)
    prompts = [[1, 2, 3, 1, 2, 3], [5]]  # 6 + 18 and 1 + 18: the first row fills all 24 positions
    ar = pj.generate(m, prompts, max_new_tokens=18, eos_token_id=())
    kw = {"draft_model": m} if method == "speculative" else {}
    res = pj.generate(m, prompts, max_new_tokens=18, method=method, variant=variant, k=k, eos_token_id=(), **kw)
    assert res.token_ids == ar.token_ids and [len(t) for t in res.token_ids] == [18, 18]


def test_lookahead_checkpoint_fingerprint_does_not_depend_on_the_dtype(tmp_path):
    from pass_jax.io.checkpoint import load_lookahead, save_lookahead
    from pass_jax.models.presets import demo_model_dir

    m32 = pj.load_model(demo_model_dir(), dtype="float32", tokenizer=False)
    save_lookahead(tmp_path / "la", pj.init_lookahead(m32.params, 2), m32)
    for dtype in ("bfloat16", "float16"):
        assert load_lookahead(tmp_path / "la", pj.load_model(demo_model_dir(), dtype=dtype, tokenizer=False)).shape == (2, 256)
