"""Look-ahead training: only the leaf learns, a killed run resumes bit for bit, meshes and processes agree."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pass_jax as pj
from pass_jax.backends import default_ops
from pass_jax.decoding.rounds import block_layout
from pass_jax.io.checkpoint import load_lookahead
from pass_jax.lookahead import training
from pass_jax.lookahead.training import TrainLayout, make_train_step
from pass_jax.models.cache import KVCache
from pass_jax.models.llama import embed_tokens, forward, logits_from_hidden
from pass_jax.sharding import make_mesh

from .conftest import build_hf_model, run_and_kill_after_checkpoint, tiny_model

REPO = Path(__file__).resolve().parents[1]
# The loss and the real tokens' pass under jit, as training runs them: one compiled program per setting,
# where calling them eagerly dispatched every primitive one by one (~5x the time on 2 CPU cores).
lookahead_loss = jax.jit(training.lookahead_loss, static_argnames=("cfg", "layout", "loss", "top_c"))
real_pass = jax.jit(training.real_pass, static_argnames="cfg")


def test_training_layout_matches_the_decoder():
    """A look-ahead trained at insertion point t sees exactly what it sees when decoding after x_0..x_t."""
    m = tiny_model(vocab=13, layers=2, heads=4, kv_heads=2)
    k, layout = 3, TrainLayout(16, 3, 5)
    la = pj.init_lookahead(m.params, k, "random")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 13, (1, 16)))
    positions, mask, _ = layout.arrays()
    n = len(layout.points) * k
    embeds = jnp.concatenate([embed_tokens(m.params, tokens), jnp.tile(la, (n // k, 1))[None]], 1)
    t = embeds.shape[1]
    run = jax.jit(forward, static_argnums=1)
    hidden, _ = run(m.params, m.config, embeds, positions[None], mask[None], KVCache.create(m.config, 1, t))
    trained = logits_from_hidden(m.params, hidden[:, 16:]).reshape(len(layout.points), k, -1)
    for j, point in enumerate(layout.points):
        prefix = tokens[:, :point + 1]
        pos, blk = block_layout(jnp.zeros((1,), jnp.int32), jnp.array([point]), point + 1, k)
        h, _ = run(m.params, m.config, jnp.concatenate([embed_tokens(m.params, prefix), la[None]], 1), pos, blk,
                   KVCache.create(m.config, 1, point + 1 + k))
        np.testing.assert_allclose(logits_from_hidden(m.params, h[:, point + 1:])[0], trained[j], atol=1e-5)


def test_points_per_row_start_at_each_rows_first_target():
    layout = TrainLayout(40, 3, 4, per_row=5)
    mask = np.zeros((4, 40), bool)
    for row, first in enumerate((5, 0, 30)):
        mask[row, first:] = True  # row 3 has no target: it starts at 0, and the mask weighs it 0
    points, real = layout.row_points(jnp.asarray(mask), 4)
    np.testing.assert_array_equal(points, [[3, 7, 11, 15, 19], [0, 4, 8, 12, 16], [28, 32, 35, 35, 35], [0, 4, 8, 12, 16]])
    np.testing.assert_array_equal(real[2], [True, True, False, False, False])  # 36 + 1 + 3 is past the sequence
    assert np.asarray(real)[[0, 1, 3]].all() and layout.num_points == 5 and TrainLayout(40, 3, 4).num_points == 9


@pytest.mark.parametrize("loss", ["ce", "distill"])
def test_points_per_row_weigh_exactly_the_blocks_they_place(loss):
    """Where each row's first target puts its points on the default ones, the loss is the default layout's; blocks
    past the sequence's end weigh nothing (the same loss as without them)."""
    m = tiny_model(vocab=17, layers=2, heads=4, kv_heads=2, scale=0.5)
    la = pj.init_lookahead(m.params, 3, "random")
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, 17, (2, 20)))
    mask = rng.random((2, 20)) < 0.7
    mask[:, :3], mask[:, 3] = False, True  # first target 3: look-ahead 1 of point 1 predicts it
    default = lookahead_loss(la, m.params, m.config, tokens, TrainLayout(20, 3, 2), loss, 0.8, jnp.asarray(mask))
    aligned = lookahead_loss(la, m.params, m.config, tokens, TrainLayout(20, 3, 2, per_row=8), loss, 0.8,
                             jnp.asarray(mask))  # points 1, 3, ..., 15: the default ones
    assert float(aligned) == pytest.approx(float(default), rel=1e-6)
    past_end = lookahead_loss(la, m.params, m.config, tokens, TrainLayout(20, 3, 2, per_row=11), loss, 0.8,
                              jnp.asarray(mask))  # three more points, past the last one (15)
    assert float(past_end) == pytest.approx(float(default), rel=1e-6)
    later = mask.copy()
    later[:, 3] = False  # first target 4: every point moves by one
    assert abs(float(lookahead_loss(la, m.params, m.config, tokens, TrainLayout(20, 3, 2, per_row=8), loss, 0.8,
                                    jnp.asarray(later))) - float(default)) > 1e-4


def test_top_c_hinge_asks_only_for_a_place_among_the_top_c():
    """softplus(c-th best other score - target score): the target 2nd of 5 satisfies c = 2, not c = 1."""
    from pass_jax.lookahead.training import _top_c_hinge

    scores = jnp.asarray([[[5.0, 4.0, 3.0, 2.0, 1.0]] * 2])  # [B=1, n=2 (k=2, one point), V=5]
    target = jnp.asarray([[1, 1]])
    np.testing.assert_allclose(_top_c_hinge(scores, target, (2, 1))[0], [np.log1p(np.exp(-1.0)), np.log1p(np.exp(1.0))],
                               rtol=1e-6)
    m = tiny_model(vocab=11, layers=1, heads=2, kv_heads=1, scale=0.5)
    tokens, layout = jnp.asarray(np.arange(24)[None] % 11), TrainLayout(24, 2, 4)
    la = pj.init_lookahead(m.params, 2, "random")
    ce = float(lookahead_loss(la, m.params, m.config, tokens, layout, "ce"))
    wide = float(lookahead_loss(la, m.params, m.config, tokens, layout, "topc", top_c=(10, 10)))
    assert ce < float(lookahead_loss(la, m.params, m.config, tokens, layout, "topc")) and ce < wide
    assert wide < float(lookahead_loss(la, m.params, m.config, tokens, layout, "topc", top_c=(1, 1)))
    with pytest.raises(ValueError, match="one width per look-ahead"):
        lookahead_loss(la, m.params, m.config, tokens, layout, "topc", top_c=(3,))


def test_mean_init_is_every_token_embeddings_mean():
    """--init mean: a start that is no particular token (SmolLM2's UNK-like token is its end-of-text separator)."""
    m = tiny_model(vocab=13, layers=1, heads=2, kv_heads=1)
    la = pj.init_lookahead(m.params, 3, "mean")
    np.testing.assert_allclose(la, np.tile(np.asarray(m.params["embed"]).mean(0), (3, 1)), rtol=1e-6)
    with pytest.raises(ValueError, match="'token', 'mean' or 'random'"):
        pj.init_lookahead(m.params, 3, "zeros")


@pytest.mark.parametrize("loss", ["ce", "distill", "topc"])
def test_only_the_leaf_trains_and_the_loss_falls(loss):
    m = tiny_model(vocab=11, layers=2, heads=4, kv_heads=2, scale=0.5)
    before = jax.tree.map(np.asarray, m.params)
    layout = TrainLayout(24, 3, 4)
    la = pj.init_lookahead(m.params, 3, "token")
    tx = optax.adam(3e-2)
    opt_state = tx.init(la)
    for leaf in jax.tree.leaves(opt_state):  # adam: a step count and two moments shaped like the leaf
        assert leaf.shape in ((), la.shape)
    assert sum(x.size for x in jax.tree.leaves(opt_state)) == 2 * la.size + 1
    tokens = jnp.asarray(np.tile(np.arange(12) % 11, (4, 2)))  # a predictable sequence
    first = float(lookahead_loss(la, m.params, m.config, tokens, layout, loss))
    step = make_train_step(m.config, layout, loss, tx)
    for _ in range(30):
        la, opt_state, value = step(la, opt_state, m.params, tokens)
    assert float(value) < 0.7 * first
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, m.params), before)
    grad = jax.grad(lookahead_loss)(la, m.params, m.config, tokens, layout, loss)
    assert jax.tree.structure(grad) == jax.tree.structure(la)


def _autodiff_target_log_prob(logits, targets):
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]


def _autodiff_swiglu(gate_up):
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return jax.nn.silu(gate) * up


@pytest.mark.parametrize("name", ["target_log_prob", "swiglu"])
def test_written_out_gradients_equal_autodiffs(name):
    """The loss's and the MLP's hand-written gradients (kept for speed) are autodiff's of the plain expressions,
    on values large enough to overflow a naive exp; the forward values are the plain ones."""
    from pass_jax.lookahead.training import target_log_prob
    from pass_jax.models.layers import swiglu

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 40)) * 8 + 200, jnp.float32)
    if name == "target_log_prob":
        targets = jnp.asarray(rng.integers(0, 40, (3, 5)))
        fn, ref = (lambda x: target_log_prob(x, targets)), (lambda x: _autodiff_target_log_prob(x, targets))
    else:
        x = x - 200
        fn, ref = swiglu, _autodiff_swiglu
    g = jnp.asarray(rng.standard_normal(ref(x).shape), jnp.float32)
    got, vjp = jax.vjp(jax.jit(fn), x)
    want, ref_vjp = jax.vjp(ref, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(vjp(g)[0]), np.asarray(ref_vjp(g)[0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["ce", "distill"])
def test_two_pass_loss_and_gradient_equal_one_pass_over_everything(loss):
    """Running the real tokens first (no gradient) and then only the blocks changes nothing but the cost; the
    position weights and the target mask weigh exactly the targets they name."""
    m = tiny_model(vocab=17, layers=2, heads=4, kv_heads=2, scale=0.5)
    layout = TrainLayout(20, 3, 2)
    la = pj.init_lookahead(m.params, 3, "random")
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 17, (2, 20)))
    target_mask = rng.random((2, 20)) < 0.6
    got = float(lookahead_loss(la, m.params, m.config, tokens, layout, loss, 0.8, jnp.asarray(target_mask)))
    assert got == pytest.approx(float(_one_pass_loss(la, m, tokens, layout, loss, 0.8, target_mask)), rel=1e-5)
    uniform = float(lookahead_loss(la, m.params, m.config, tokens, layout, loss))
    assert uniform == pytest.approx(float(_one_pass_loss(la, m, tokens, layout, loss, 1.0, np.ones((2, 20)))), rel=1e-5)
    assert abs(got - uniform) > 1e-3  # the weights and the mask matter
    grad = jax.grad(lookahead_loss)(la, m.params, m.config, tokens, layout, loss, 0.8, jnp.asarray(target_mask))
    ref = jax.grad(_one_pass_loss)(la, m, tokens, layout, loss, 0.8, target_mask)
    np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss", ["ce", "distill"])
def test_a_kept_real_pass_is_the_one_the_loss_would_run(loss):
    """`real` replaces the loss's first pass exactly; rows looked up from a RealPasses store (built in chunks that
    do not divide the rows) are the rows' own passes; and a real pass of other tokens changes the loss."""
    from train.reuse import RealPasses, bytes_per_row

    m = tiny_model(vocab=17, layers=2, heads=4, kv_heads=2, scale=0.5)
    layout, la = TrainLayout(20, 3, 2), pj.init_lookahead(m.params, 3, "random")
    data = np.random.default_rng(1).integers(0, 17, (5, 20)).astype(np.int32)
    store = RealPasses(m.params, m.config, data, chunk=2, mesh=make_mesh(1, 1), quiet=True)
    held = sum(x.nbytes for x in (store.hidden, *store.keys, *store.values))
    assert held == 5 * bytes_per_row(m.config, 20, "float32")  # the memory check's estimate is what it holds
    assert bytes_per_row(m.config, 20, "bfloat16") < bytes_per_row(m.config, 20, "float32")
    rows = np.array([4, 1, 4])
    tokens = jnp.asarray(data[rows])
    kept = store.get(rows, make_mesh(1, 1))
    own = real_pass(m.params, m.config, tokens)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), kept, own)
    value_grad = jax.value_and_grad(lookahead_loss)
    ref, ref_grad = value_grad(la, m.params, m.config, tokens, layout, loss, 0.8)
    got, got_grad = value_grad(la, m.params, m.config, tokens, layout, loss, 0.8, real=kept)
    assert float(got) == pytest.approx(float(ref), rel=1e-6)
    np.testing.assert_allclose(got_grad, ref_grad, rtol=1e-4, atol=1e-5)
    other = real_pass(m.params, m.config, jnp.asarray(data[[0, 2, 3]]))
    assert abs(float(lookahead_loss(la, m.params, m.config, tokens, layout, loss, 0.8, real=other)) - float(ref)) > 1e-3


def _one_pass_loss(la, m, tokens, layout, loss, decay, target_mask):
    from train.step_bench import one_pass_loss

    return jax.jit(one_pass_loss, static_argnames=("cfg", "layout", "loss"))(la, m.params, m.config, tokens, layout,
                                                                             loss, decay, target_mask)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    # rows of --seq-len 24 fill its whole context: self-data generation and PaSS decoding must take them
    build_hf_model("llama", vocab_size=48, max_position_embeddings=24).save_pretrained(path)
    return str(path)


def _train_cmd(base, out, *extra, steps=40):
    return [sys.executable, "-m", "train", "lookahead", "--model", base, "--out", str(out), "--k", "2",
            "--steps", str(steps), "--batch-size", "4", "--seq-len", "24", "--stride", "4", "--self-samples", "8",
            "--save-every", "5", "--eval-every", "20", "--quiet", "--lr", "1e-2", "--deep", "0", *extra]


def _env(devices=1):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _leaf(out, base):
    return load_lookahead(out, pj.load_model(base))


def test_train_cli_end_to_end_and_generate_with_it(base_dir, tmp_path):
    out = tmp_path / "run"
    subprocess.run(_train_cmd(base_dir, out), check=True, env=_env(), cwd=REPO)
    meta = json.loads((out / "lookahead.json").read_text())
    assert meta["k"] == 2 and meta["d_model"] == 64
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [20, 40] and all(r["tokens_per_forward"] >= 1 for r in metrics)
    curve = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == list(range(5, 41, 5)) and all(np.isfinite(r["loss"]) for r in curve)
    rows = np.load(out / "self_data.npz")
    assert rows["tokens"].shape == (8, 24) and rows["mask"][:, -1].all()  # every row runs to the context's end
    res = subprocess.run([sys.executable, "-m", "infer", "generate", "--model", base_dir, "--k", "2", "--lookahead",
                          str(out), "--prompt-ids", "1,2,3", "--max-new-tokens", "21", "--compare", "--json"],
                         check=True, capture_output=True, text=True, env=_env(), cwd=REPO)
    res = json.loads(res.stdout)  # 3 + 21 tokens fill the context: the draft block reaches past it
    assert len(res["token_ids"][0]) == 21 and res["token_ids"] == res["autoregressive"]["token_ids"]
    again = subprocess.run(_train_cmd(base_dir, out), check=False, env=_env(), cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr
    changed = subprocess.run(_train_cmd(base_dir, out, "--resume", "--lr", "0.5"), check=False, env=_env(), cwd=REPO,
                             capture_output=True, text=True)
    assert changed.returncode == 2 and "lr 0.01 -> 0.5" in changed.stderr


@pytest.mark.parametrize("yaml_text,msg", [("loss: kl\n", "loss must be one of"), ("stepz: 3\n", "unknown setting"),
                                           ("k: many\n", "invalid literal")])
def test_bad_yaml_config_is_a_clear_error(tmp_path, capsys, yaml_text, msg):
    from train.__main__ import main

    (tmp_path / "c.yaml").write_text(yaml_text)
    assert main(["lookahead", "--config", str(tmp_path / "c.yaml"), "--model", "x", "--out", str(tmp_path)]) == 2
    assert msg in capsys.readouterr().err


def test_seq_len_past_the_models_context_is_one_clear_error(base_dir, tmp_path, capsys):
    from train.__main__ import main

    argv = _train_cmd(base_dir, tmp_path / "run")[3:]  # without the interpreter and "-m train"
    assert main([*argv, "--seq-len", "25"]) == 2
    assert "--seq-len 25 is longer than the model's context (max_position_embeddings 24)" in capsys.readouterr().err


@pytest.mark.slow  # the default suite resumes the default (deep) leaf: test_deep.py
def test_killed_run_resumes_bit_for_bit(base_dir, tmp_path):
    steps = 300
    subprocess.run(_train_cmd(base_dir, tmp_path / "straight", steps=steps), check=True, env=_env(), cwd=REPO)
    out = tmp_path / "killed"
    run_and_kill_after_checkpoint(_train_cmd(base_dir, out, steps=steps), out / "checkpoints" / "10",
                                  out / "lookahead.json", env=_env(), cwd=REPO)
    subprocess.run(_train_cmd(base_dir, out, "--resume", steps=steps), check=True, env=_env(), cwd=REPO)
    np.testing.assert_array_equal(_leaf(out, base_dir), _leaf(tmp_path / "straight", base_dir))
    curves = [[(r["step"], r["loss"]) for r in map(json.loads, (run / "loss.jsonl").read_text().splitlines())]
              for run in (out, tmp_path / "straight")]
    assert curves[0] == curves[1]  # the loss curve neither loses nor repeats a checkpoint interval


def test_mesh_of_8_devices_matches_one_device(base_dir, tmp_path):
    """Also: a run that keeps each row's real-token pass (the mesh run) trains the leaf of one that reruns it
    every step (--no-reuse), with blocks placed from each row's first target (--points)."""
    runs = {}
    for name, extra, devices in (("one", ("--no-reuse",), 1), ("mesh", ("--mesh", "2,4"), 8)):
        runs[name] = subprocess.run(_train_cmd(base_dir, tmp_path / name, "--points", "3", *extra, steps=10), check=True,
                                    env=_env(devices), cwd=REPO, capture_output=True, text=True).stderr
    assert "real tokens once" in runs["mesh"] and "real tokens once" not in runs["one"]
    np.testing.assert_allclose(_leaf(tmp_path / "mesh", base_dir), _leaf(tmp_path / "one", base_dir), atol=1e-5)


@pytest.mark.slow  # two-process decoding runs by default (test_sharding.py)
def test_two_processes_match_one(base_dir, tmp_path):
    subprocess.run(_train_cmd(base_dir, tmp_path / "one", steps=10), check=True, env=_env(), cwd=REPO)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(_train_cmd(base_dir, tmp_path / "multi", "--coordinator", f"127.0.0.1:{port}",
                                         "--num-processes", "2", "--process-id", str(i), steps=10),
                              env=_env(), cwd=REPO) for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    np.testing.assert_allclose(_leaf(tmp_path / "multi", base_dir), _leaf(tmp_path / "one", base_dir), atol=1e-5)


def test_training_commands_share_common_without_importing_each_other():
    import ast

    def imported(name):
        tree = ast.parse((REPO / "train" / f"{name}.py").read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}

    assert "pretrain" not in imported("lookahead") and "lookahead" not in imported("pretrain")
    assert "common" in imported("lookahead") and "common" in imported("pretrain")
    assert not {"lookahead", "pretrain"} & imported("common")


def test_self_data_generation_killed_midway_resumes_where_it_stopped(tmp_path, monkeypatch):
    import argparse

    from train.lookahead import _self_data

    m = tiny_model(vocab=23, layers=1, scale=0.5)
    args = argparse.Namespace(self_data=None, seq_len=10, self_samples=20, self_prompts=["random"], seed=1,
                              self_temperature=0.0, chat=False, quiet=True, model="tiny")
    (tmp_path / "straight").mkdir()
    straight, straight_mask = _self_data(m, args, tmp_path / "straight")
    calls, real = [], pj.generate

    def dies_on_the_third_batch(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    (tmp_path / "killed").mkdir()
    monkeypatch.setattr(pj, "generate", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _self_data(m, args, tmp_path / "killed")
    assert not (tmp_path / "killed" / "self_data.npz").exists()
    calls.clear()
    tokens, mask = _self_data(m, args, tmp_path / "killed")  # batches of 8: 2 done, 1 left
    assert len(calls) == 1 and not list((tmp_path / "killed").glob("self_data.partial*"))
    np.testing.assert_array_equal(tokens, straight)
    np.testing.assert_array_equal(mask, straight_mask)


def test_self_data_is_the_models_own_greedy_continuation_and_only_it_is_a_target(tmp_path):
    import argparse

    from train.data import RowBatches
    from train.lookahead import _self_data

    m = tiny_model(vocab=23, layers=1, scale=0.5)
    args = argparse.Namespace(self_data=None, seq_len=12, self_samples=5, self_prompts=["random"], seed=3,
                              self_temperature=0.0, chat=False, quiet=True, model="tiny")
    tokens, mask = _self_data(m, args, tmp_path)
    assert tokens.shape == mask.shape == (5, 12) and (tmp_path / "self_data.npz").is_file()
    greedy = pj.generate(m, tokens[:, :1].tolist(), max_new_tokens=11, eos_token_id=()).token_ids
    np.testing.assert_array_equal(tokens[:, 1:], np.asarray(greedy))
    assert not mask[:, 0].any() and mask[:, 1:].all()  # the prompt token is no target
    again, _ = _self_data(m, argparse.Namespace(**{**vars(args), "seed": 99}), tmp_path)  # cached: reused as is
    np.testing.assert_array_equal(again, tokens)
    rows = RowBatches(tokens, mask, batch_size=3, seed=0, holdout=0.2)
    assert len(rows.tokens) == 4 and rows.eval_prompts(4, 8) == [tokens[4, :1].tolist()]
    b1, m1 = rows.batch(7)
    b2, _ = rows.batch(7)
    np.testing.assert_array_equal(b1, b2)
    assert b1.shape == m1.shape == (3, 12)


def test_chat_training_prompts_never_equal_a_benchmark_prompt():
    from infer.bench_model import read_prompts
    from train.prompts import chat_prompts, stdlib_prompts

    held_back = {p for f in (REPO / "infer" / "prompts").glob("*.jsonl") for p in read_prompts(str(f))}
    train = chat_prompts()
    import yaml

    recipe = yaml.safe_load((REPO / "configs" / "lookahead-smollm2.yaml").read_text())
    chat_share = recipe["self_samples"] // len(recipe["self_prompts"])  # the shipped recipe's chat rows: none repeat
    assert len(set(train)) == len(train) >= chat_share and not held_back & set(train)
    code = stdlib_prompts(limit=50)
    assert len(code) >= 50 and all(c.lstrip().startswith("def ") and '"""' in c or "'''" in c for c in code)
    assert not held_back & set(code)


@pytest.mark.slow
def test_sweep_trains_each_variant_once_on_shared_data_and_tables_them(tmp_path):
    from train.__main__ import main

    recipes = tmp_path / "r.yaml"
    recipes.write_text("base: {k: 2, steps: 3, batch_size: 2, seq_len: 24, stride: 4, self_prompts: [random], "
                       "self_samples: 4, save_every: 3, eval_every: 3, eval_prompts: 1}\n"
                       "variants:\n  - {name: a, lr: 0.1}\n  - {name: b, lr: 0.01, loss: distill}\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text("def add(a, b):\n\n")
    argv = ["sweep", "--recipes", str(recipes), "--out", str(tmp_path / "out"), "--prompts", str(prompts),
            "--ks", "1,2", "--max-new-tokens", "8", "--ceiling-depth", "1", "--quiet"]
    assert main(argv) == 0
    res = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert list(res) == ["untrained", "untrained mean embedding", "a", "b"]
    assert all(set(r["by_k"]) == {"1", "2"} for r in res.values())
    assert len(res["untrained"]["ceiling"]) == 1 and res["b"]["recipe"]["loss"] == "distill"
    assert all(r["by_k"]["1"] >= 1 and len(r["top1"]) == 2 for r in res.values())
    assert (tmp_path / "out" / "a" / "self_data.npz").is_file()
    assert not (tmp_path / "out" / "b" / "self_data.npz").exists()  # b trained on a's rows
    assert res["b"]["recipe"]["self_data"].endswith("a/self_data.npz")
    assert (tmp_path / "out" / "sweep.md").read_text().count("\n| ") == 4
    mtime = (tmp_path / "out" / "a" / "lookahead.json").stat().st_mtime
    assert main(argv) == 0 and (tmp_path / "out" / "a" / "lookahead.json").stat().st_mtime == mtime  # nothing retrained
    assert main(argv + ["--rescore", "--tree", "2,1"]) == 0 and (tmp_path / "out" / "a" / "lookahead.json").stat().st_mtime == mtime
    again = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert list(again) == list(res) and all(r["tree"]["widths"] == [2, 1] for r in again.values())
    assert all(r["tree"]["tokens_per_forward"] >= r["by_k"]["2"] for r in again.values())  # a wider tree accepts more
    assert "tok/fwd tree 2,1" in (tmp_path / "out" / "sweep.md").read_text()


@pytest.mark.slow
def test_bench_step_times_every_formulation(tmp_path, capsys):
    from train.__main__ import main

    out = tmp_path / "s.json"
    assert main(["bench-step", "--k", "2", "--batch-size", "2", "--seq-len", "16", "--strides", "2,4", "--repeats", "1",
                 "--single-pass", "--xla-too", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    kernels = {True, False} if default_ops().name == "cpu" else {False}  # --xla-too: each again with XLA's ops
    assert {(r["stride"], r["formulation"], r["cpu_kernels"]) for r in rows} == {
        (s, f, on) for s in (2, 4) for f in ("two_pass", "kept_real", "single_pass") for on in kernels}
    assert all(r["seconds_per_step"] > 0 and r["lookahead_targets_per_second"] > 0 for r in rows)
    assert all((r["formulation"] == "kept_real") == ("real_pass_seconds_per_batch" in r) for r in rows)
