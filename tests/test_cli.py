"""`python -m infer generate`: the JSON contract (README.md, "JSON output") and clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import pass_jax as pj
from infer.__main__ import main
from pass_jax.io.checkpoint import save_lookahead

from .conftest import tiny_model


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_contract(hf_dirs, capsys):
    path = hf_dirs["llama"][1]
    code, out, _ = _run(["generate", "--model", path, "--method", "pass", "--k", "3", "--tree", "2,1,1",
                         "--prompt-ids", "1,2,3", "--prompt-ids", "4,5", "--max-new-tokens", "9", "--json"], capsys)
    assert code == 0
    res = json.loads(out)
    assert set(res) == {"method", "k", "texts", "token_ids", "stats"}
    assert res["method"] == "pass" and res["k"] == 3 and res["texts"] is None
    assert [len(t) for t in res["token_ids"]] == [9, 9]
    for key in ("new_tokens", "forward_passes", "tokens_per_forward", "seconds", "compile_seconds",
                "tokens_per_second", "acceptance_by_position"):
        assert key in res["stats"]
    assert len(res["stats"]["acceptance_by_position"]) == 3  # one per tree depth
    model = pj.load_model(path)
    assert res["token_ids"] == pj.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=9).token_ids


def test_drafting_flag_chooses_adaptive_or_whole_tree_rounds(hf_dirs, capsys):
    path = hf_dirs["llama"][1]
    argv = ["generate", "--model", path, "--method", "pass", "--prompt-ids", "1,2,3,1,2,3", "--max-new-tokens", "8",
            "--json"]
    adaptive, full = (json.loads(_run(argv + extra, capsys)[1]) for extra in ([], ["--drafting", "full"]))
    assert adaptive["token_ids"] == full["token_ids"]
    shares = adaptive["stats"]["round_options"]
    assert set(shares) == {"ar", "ngram", "tree", "full"} and adaptive["stats"]["drafting_skipped"] == shares["ar"]
    assert "round_options" not in full["stats"]
    code, out, _ = _run(argv[:-1], capsys)
    assert code == 0 and "[drafting] rounds: ar" in out


def test_generate_with_lookahead_checkpoint(hf_dirs, tmp_path, capsys):
    path = hf_dirs["llama"][1]
    model = pj.load_model(path)
    save_lookahead(tmp_path / "la", pj.init_lookahead(model.params, 2, "random"), model)
    code, out, _ = _run(["generate", "--model", path, "--k", "2", "--lookahead", str(tmp_path / "la"),
                         "--prompt-ids", "7,8,9", "--max-new-tokens", "5", "--json"], capsys)
    assert code == 0 and len(json.loads(out)["token_ids"][0]) == 5
    code, _, err = _run(["generate", "--model", path, "--k", "4", "--lookahead", str(tmp_path / "la"),
                         "--prompt-ids", "7", "--json"], capsys)
    assert code == 2 and "holds k=2" in err and "k=4 asked for" in err


@pytest.fixture(scope="module")
def k8_checkpoint(hf_dirs, tmp_path_factory):
    model = pj.load_model(hf_dirs["llama"][1])
    la = pj.init_lookahead(model.params, 8, "random")
    path = tmp_path_factory.mktemp("la8")
    save_lookahead(path, la, model)
    return model, la, str(path)


def test_a_k8_checkpoint_runs_at_k4_as_its_first_4_embeddings(hf_dirs, k8_checkpoint, capsys):
    from pass_jax.io.checkpoint import load_lookahead

    model, la, path = k8_checkpoint
    assert (load_lookahead(path, model, 4) == la[:4]).all()
    code, out, _ = _run(["generate", "--model", hf_dirs["llama"][1], "--lookahead", path, "--k", "4", "--variant",
                         "fused", "--temperature", "1", "--prompt-ids", "5,6,7", "--max-new-tokens", "16", "--json"],
                        capsys)
    res = json.loads(out)
    assert code == 0 and res["k"] == 4
    kw = {"max_new_tokens": 16, "method": "pass", "k": 4, "variant": "fused", "temperature": 1.0}
    first = pj.generate(model, [[5, 6, 7]], lookahead=la[:4], **kw)
    assert res["token_ids"] == first.token_ids  # sampled drafts: the output depends on which embeddings ran
    assert res["stats"]["acceptance_by_position"] == first.stats.acceptance_by_position
    assert pj.generate(model, [[5, 6, 7]], lookahead=la[4:], **kw).token_ids != first.token_ids


@pytest.mark.parametrize("argv", [["--k", "0"], ["--k", "17"], ["--k", "0", "--lookahead", "untrained"],
                                  ["--k", "0", "--method", "ar"], ["--k", "-1", "--method", "speculative"]])
def test_k_outside_1_to_16_is_named_whatever_else_is_given(hf_dirs, k8_checkpoint, capsys, argv):
    if "--lookahead" not in argv:
        argv = [*argv, "--lookahead", k8_checkpoint[2]]
    code, _, err = _run(["generate", "--model", hf_dirs["llama"][1], "--prompt-ids", "1", *argv], capsys)
    assert code == 2 and "k must be an integer in 1..16" in err


def test_lookahead_checkpoint_for_another_model_is_refused(hf_dirs, tmp_path):
    other = tiny_model(hidden=64, vocab=97)
    save_lookahead(tmp_path / "la", pj.init_lookahead(other.params, 2, "random"), other)
    with pytest.raises(pj.ConfigError, match="another base model"):
        from pass_jax.io.checkpoint import load_lookahead

        load_lookahead(tmp_path / "la", pj.load_model(hf_dirs["llama"][1]))
    small = tiny_model(hidden=32)
    with pytest.raises(pj.ConfigError, match="d_model=64"):
        load_lookahead(tmp_path / "la", small)


def test_other_weights_of_the_same_architecture_warn_and_shipped_lookaheads_are_found(tmp_path, monkeypatch):
    """A look-ahead trained on other weights of the same architecture (bf16 hub weights vs a dequantized GGUF)
    still loads, with a warning; a shipped one is used for the exact weights it was trained on, or by name."""
    from infer.options import resolve_lookahead
    from pass_jax.io import checkpoint

    a, b = tiny_model(seed=1), tiny_model(seed=2)
    la = pj.init_lookahead(a.params, 3, "random")
    save_lookahead(tmp_path / "ship" / "tiny-a", la, a)
    with pytest.warns(checkpoint.OtherWeightsWarning, match="other weights"):
        np.testing.assert_array_equal(checkpoint.load_lookahead(tmp_path / "ship" / "tiny-a", b), la)
    monkeypatch.setattr(checkpoint, "SHIPPED", tmp_path / "ship")
    assert checkpoint.find_lookahead(a) == tmp_path / "ship" / "tiny-a" and checkpoint.find_lookahead(b) is None
    got, k = resolve_lookahead("auto", a, None)
    assert k == 3
    np.testing.assert_array_equal(got, la)
    assert resolve_lookahead("auto", b, None) == (None, 4)  # nothing trained for b: the untrained baseline
    with pytest.warns(checkpoint.OtherWeightsWarning):
        assert resolve_lookahead("tiny-a", b, 2)[1] == 2  # by name


def test_corrupt_lookahead_checkpoint(hf_dirs, tmp_path):
    from pass_jax.io.checkpoint import load_lookahead

    model = pj.load_model(hf_dirs["llama"][1])
    save_lookahead(tmp_path / "la", pj.init_lookahead(model.params, 2, "random"), model)
    for f in (tmp_path / "la" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    with pytest.raises(pj.ConfigError, match="cannot read look-ahead checkpoint"):
        load_lookahead(tmp_path / "la", model)


def test_speculative_from_the_command_line(hf_dirs, capsys):
    path = hf_dirs["llama"][1]
    code, out, _ = _run(["generate", "--model", path, "--method", "speculative", "--draft-model", path, "--k", "2",
                         "--prompt-ids", "3,4", "--max-new-tokens", "7", "--json"], capsys)
    res = json.loads(out)
    assert code == 0 and res["method"] == "speculative" and res["stats"]["acceptance_by_position"] == [1.0, 1.0]


@pytest.mark.parametrize("argv,msg", [
    (["--model", "/nonexistent", "--prompt-ids", "1"], "does not exist"),
    (["--prompt-ids", "1", "--k", "17"], "1..16"),
    (["--prompt-ids", "1", "--max-new-tokens", "50", "--max-len", "32"], "KV cache holds 32"),
    (["--prompt-ids", "1", "--method", "speculative"], "--draft-model"),
    (["--prompt", "hello"], "no tokenizer"),
])
def test_cli_errors_are_one_clear_line(hf_dirs, capsys, argv, msg):
    if "--model" not in argv:
        argv = ["--model", hf_dirs["llama"][1], *argv]
    code, out, err = _run(["generate", *argv], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and msg in err and "Traceback" not in err


def test_help_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "infer", "generate", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--model", "--method", "--k", "--lookahead", "--prompt-ids", "--json", "--temperature", "--top-p"):
        assert flag in out
    from pass_jax.decoding.plan import DEFAULT_TREE

    for command in ("generate", "humaneval"):  # the default tree each names is generate's
        text = subprocess.run([sys.executable, "-m", "infer", command, "--help"], capture_output=True, text=True,
                              check=True, env={**os.environ, "COLUMNS": "1000"}).stdout
        assert f"'{DEFAULT_TREE.describe()}'" in text


@pytest.fixture(scope="module")
def model_with_tokenizer(tmp_path_factory):
    """A tiny Llama saved beside a word-level tokenizer, as a Hugging Face directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .conftest import build_hf_model

    words = ["<unk>", "<s>", "</s>", *["def", "return", "if", "else", "for", "in", "range", "print", "x", "y", "z", "(", ")", ":", "=", "+", "1", "2"]]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    path = tmp_path_factory.mktemp("with_tokenizer")
    build_hf_model("llama", vocab_size=len(words)).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path), fast


def test_text_prompts_use_the_directory_tokenizer(model_with_tokenizer, capsys):
    path, tok = model_with_tokenizer
    model = pj.load_model(path)
    assert model.tokenizer is not None and model.tokenizer.unk_token_id == 0
    res = pj.generate(model, ["def x ( ) :", "print y"], max_new_tokens=6, method="pass", k=2, eos_token_id=())
    ids = [tok("def x ( ) :")["input_ids"], tok("print y")["input_ids"]]
    assert res.token_ids == pj.generate(model, ids, max_new_tokens=6, eos_token_id=()).token_ids
    assert res.texts == [tok.decode(t, skip_special_tokens=True) for t in res.token_ids]
    code, out, _ = _run(["generate", "--model", path, "--prompt", "def x ( ) :", "--max-new-tokens", "6",
                         "--json"], capsys)
    assert code == 0 and json.loads(out)["texts"][0] == res.texts[0]


def test_compare_reports_the_speedup(hf_dirs, capsys):
    code, out, _ = _run(["generate", "--model", hf_dirs["llama"][1], "--k", "2", "--prompt-ids", "1,2,3",
                         "--max-new-tokens", "6", "--compare", "--json"], capsys)
    res = json.loads(out)
    assert code == 0 and res["autoregressive"]["token_ids"] == res["token_ids"]
    assert res["autoregressive"]["speedup"] > 0
    code, out, _ = _run(["generate", "--model", hf_dirs["llama"][1], "--prompt-ids", "1,2,3", "--max-new-tokens",
                         "6", "--compare"], capsys)
    assert code == 0 and "speed-up" in out and "identical output" in out


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
def test_model_flag_runs_the_other_architectures(hf_dirs, kind, capsys):
    code, out, _ = _run(["generate", "--model", hf_dirs[kind][1], "--prompt-ids", "1,2,3", "--max-new-tokens", "8",
                         "--compare", "--json"], capsys)
    res = json.loads(out)
    assert code == 0 and len(res["token_ids"][0]) == 8 and res["autoregressive"]["token_ids"] == res["token_ids"]


def test_readme_main_command_runs_on_the_embedded_demo_model(capsys):
    code, out, _ = _run(["generate", "--prompt", "def fibonacci(n):", "--max-new-tokens", "12", "--compare", "--json"],
                        capsys)
    res = json.loads(out)
    assert code == 0 and res["method"] == "pass" and res["k"] == 4  # the demo's trained look-ahead
    assert res["autoregressive"]["token_ids"] == res["token_ids"] and res["texts"][0]


def test_main_command_prints_no_third_party_warnings_and_runs_again_from_the_compile_cache(tmp_path):
    """The README's main command, run twice as a user without PyTorch would (torch made unimportable):
    stderr stays empty, since generate logs nothing on success (transformers used to announce that PyTorch
    was not found); the first run writes its compiled programs, the second finds every one of them in
    the persistent compilation cache (it writes nothing new)."""
    cache = tmp_path / "xla"
    main_command = ["generate", "--prompt", "def f(x):", "--compare", "--max-new-tokens", "8",
                    "--compile-cache", str(cache)]
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['infer', *sys.argv[1:]]; "
            "runpy.run_module('infer', run_name='__main__', alter_sys=True)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "PASS_JAX_COMPILE_CACHE"))}
    runs = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", code, *main_command], capture_output=True, text=True,
                             cwd=tmp_path, env=env, check=False)
        assert res.returncode == 0 and "speed-up" in res.stdout
        assert [line for line in res.stderr.splitlines() if line.strip()] == []
        runs.append((res.stdout.split("[pass")[0], sorted(p.name for p in cache.iterdir())))
    (first, written), (second, found) = runs
    assert any(name.startswith("jit_") for name in written) and found == written
    assert second == first  # the same completion


def test_compile_cache_setting_and_off_switch(tmp_path, monkeypatch):
    import jax

    from pass_jax.compile_cache import enable

    before = jax.config.jax_compilation_cache_dir
    assert enable("off") is None and enable("0") is None and jax.config.jax_compilation_cache_dir == before
    monkeypatch.setenv("PASS_JAX_COMPILE_CACHE", "off")
    assert enable() is None and jax.config.jax_compilation_cache_dir == before
    try:
        monkeypatch.setenv("PASS_JAX_COMPILE_CACHE", str(tmp_path / "env"))
        assert enable() == tmp_path / "env" and jax.config.jax_compilation_cache_dir == str(tmp_path / "env")
        assert enable(tmp_path / "flag") == tmp_path / "flag"  # the flag wins over the environment
        (tmp_path / "file").write_text("")
        with pytest.raises(ValueError, match="cannot create it"):
            enable(tmp_path / "file" / "sub")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_allow_long_turns_the_context_error_into_a_warning(tmp_path, capsys):
    from .conftest import build_hf_model

    build_hf_model("llama", max_position_embeddings=16).save_pretrained(tmp_path)
    argv = ["generate", "--model", str(tmp_path), "--method", "ar", "--prompt-ids", "1,2,3", "--max-new-tokens", "20"]
    code, _, err = _run(argv, capsys)
    assert code == 2 and "max_position_embeddings 16" in err and "--allow-long" in err
    with pytest.warns(UserWarning, match="max_position_embeddings 16"):
        code, out, _ = _run([*argv, "--allow-long", "--json"], capsys)
    assert code == 0 and len(json.loads(out)["token_ids"][0]) == 20


def test_stats_are_a_frozen_dataclass_whose_dict_is_the_json_stats(hf_dirs):
    import dataclasses

    model = pj.load_model(hf_dirs["llama"][1])
    r = pj.generate(model, [[1, 2, 3]], max_new_tokens=5, method="pass", k=2, variant="fused")
    assert isinstance(r.stats, pj.GenerationStats) and r.stats.new_tokens == 5 and len(r.stats.row_forward_passes) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.stats.seconds = 0.0
    d = json.loads(json.dumps(r.stats.to_dict()))
    assert list(d) == ["new_tokens", "forward_passes", "tokens_per_forward", "seconds", "compile_seconds",
                       "tokens_per_second", "acceptance_by_position", "row_forward_passes"]
    assert d["acceptance_by_position"] == r.stats.acceptance_by_position and r.stats["seconds"] == r.stats.seconds
    tree = pj.generate(model, [[1, 2, 3]], max_new_tokens=5, method="pass", k=2)  # tree variant: per-node rates too
    assert tree.stats.to_dict()["node_acceptance"] == tree.stats.node_acceptance


def test_shipped_lookaheads_are_complete_and_say_how_they_were_made():
    """Every look-ahead in pass_jax/lookaheads: metadata with its architecture, fingerprint, recipe and
    command, and arrays of the shape it declares (the model itself is not needed, nor downloaded)."""
    import orbax.checkpoint as ocp

    from pass_jax.io.checkpoint import shipped_lookaheads

    shipped = shipped_lookaheads()
    assert "smollm2-135m-instruct" in shipped
    for path in shipped.values():
        meta = json.loads((path / "lookahead.json").read_text())
        assert {"k", "d_model", "base_model_fingerprint", "base_model_architecture", "recipe", "command"} <= set(meta)
        arch = meta["base_model_architecture"]
        with ocp.StandardCheckpointer() as ckpt:
            state = ckpt.restore(path / "state")
        assert state["lookahead"].shape == (meta["k"], meta["d_model"]) == (meta["k"], arch["hidden_size"])
        if meta.get("deep_prefix"):
            assert state["prefix"].shape == (arch["num_layers"], 2, meta["deep_prefix"], arch["num_kv_heads"],
                                             arch["head_dim"])


@pytest.mark.slow
def test_tune_decodes_its_finalists_side_by_side_and_answers_the_fastest(tmp_path, capsys):
    from pass_jax.decoding.plan import DEFAULT_TREE

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n\nimport os\nimport sys\nimport os\n")
    code, out, _ = _run(["tune", "--prompts", str(prompts), "--max-new-tokens", "12", "--repeats", "1",
                         "--max-nodes", "6", "--also", "2;ngram=2;blocks=1", "--out", str(tmp_path / "tune.json")], capsys)
    res = json.loads(out)
    measured = res["measured"]
    assert code == 0 and json.loads((tmp_path / "tune.json").read_text()) == res
    assert {"ar", DEFAULT_TREE.describe(), "2;ngram=2;blocks=1"} < set(measured) and 0 <= res["ngram_share"] <= 1
    assert res["expected_best"] in measured or res["expected_best"] == "ar"
    assert res["chosen"] == max(measured, key=lambda n: measured[n]["tokens_per_second"])
    assert all(m["identical_to_ar"] for m in measured.values())  # greedy: every tree is lossless
    assert res["machine"]["cpu_count"] >= 1


@pytest.mark.parametrize("cli, command", [("infer", "generate"), ("infer", "bench"), ("infer", "convert"),
                                          ("infer", "humaneval"), ("infer", "tune"), ("train", "lookahead"),
                                          ("train", "eval-lookahead")])
def test_every_model_loading_command_offers_the_same_dtypes(cli, command, capsys):
    import importlib

    from infer.options import DTYPE_CHOICES

    cli_main = importlib.import_module(f"{cli}.__main__").main
    with pytest.raises(SystemExit) as exc:
        cli_main([command, "--help"])
    assert exc.value.code == 0 and "--dtype {" + ",".join(DTYPE_CHOICES) + "}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # float16 loads in the library, but no CLI offers it: a usage error
        cli_main([command, "--dtype", "float16", *(["in.gguf", "out"] if command == "convert" else [])])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "invalid choice: 'float16'" in err and "Traceback" not in err
