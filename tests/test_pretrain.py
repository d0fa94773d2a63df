"""python -m train pretrain: tokenizer + model from a local corpus, resumable, loadable by transformers."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pass_jax as pj

from .conftest import run_and_kill_after_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (d / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n\n\nclass C{i}:\n    pass\n" * 3)
    return str(d)


def _cmd(corpus, out, steps, *extra):
    return [sys.executable, "-m", "train", "pretrain", "--corpus", corpus, "--out", str(out), "--vocab-size", "300",
            "--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "2", "--num-heads", "4",
            "--num-kv-heads", "2", "--head-dim", "8", "--seq-len", "32", "--batch-size", "4", "--steps", str(steps),
            "--save-every", "5", "--warmup", "2", "--quiet", *extra]


@pytest.mark.slow
def test_pretrain_resumes_exactly_and_saves_a_loadable_model(corpus, tmp_path):
    steps = 300
    subprocess.run(_cmd(corpus, tmp_path / "straight", steps), check=True, cwd=REPO)
    split = tmp_path / "split"
    run_and_kill_after_checkpoint(_cmd(corpus, split, steps), split / "checkpoints" / "10",
                                  split / "pretrain_summary.json", cwd=REPO)
    subprocess.run(_cmd(corpus, split, steps, "--resume"), check=True, cwd=REPO)
    a, b = pj.load_model(tmp_path / "straight"), pj.load_model(tmp_path / "split")
    for x, y in zip(jax_leaves(a.params), jax_leaves(b.params)):
        np.testing.assert_array_equal(x, y)
    summary = json.loads((tmp_path / "straight" / "pretrain_summary.json").read_text())
    log = [json.loads(line) for line in (tmp_path / "straight" / "pretrain_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"] and summary["steps"] == steps
    assert a.tokenizer is not None and a.tokenizer.decode(a.tokenizer("def f1(x):")["input_ids"]) == "def f1(x):"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tmp_path / "straight")
    AutoTokenizer.from_pretrained(tmp_path / "straight")
    res = pj.generate(a, ["def f3(x):"], max_new_tokens=8, method="pass", k=2)
    assert res.texts is not None and len(res.token_ids[0]) <= 8


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]
