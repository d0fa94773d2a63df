"""python -m train bench-step: time one look-ahead training step (two-pass loss, value and gradient, AdamW).

For each --dtypes and --strides: the median of --repeats steps after a compiled warm-up, on random token
rows of --batch-size x --seq-len, as sequence tokens per second and look-ahead targets per second.
Formulations, side by side in the same run: "two_pass" (the step as `train lookahead` runs it on data
that does not recur); "kept_real" (the step given the batch's real-token pass, as it runs on
self-generated data, whose rows' passes are run once and kept; the row also gives that pass's own
time per batch, paid once per row and sitting); with --single-pass, the formulation the two-pass loss
replaced (real tokens and blocks in one pass, differentiated whole). With --xla-too, each again with
pass-jax's CPU kernels off (XLA's ops only: the training attention kernel's before and after, in one
run). JSON on stdout and in --out.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time


def add_parser(sub) -> None:
    p = sub.add_parser("bench-step", help="time a look-ahead training step", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base model (default: the embedded demo model; 'smollm2' works too)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--strides", default="4", help="comma-separated look-ahead strides (default 4)")
    p.add_argument("--points", type=int, default=None, metavar="P",
                   help="P blocks per row from its first target (as `train lookahead --points`; the random rows "
                        "here have targets from the start)")
    p.add_argument("--dtypes", default="float32", help="comma-separated base weight dtypes (default float32)")
    p.add_argument("--deep", type=int, default=0, help="time a deep look-ahead with P prefix pairs per layer")
    p.add_argument("--single-pass", action="store_true", help="also time the single-pass formulation")
    p.add_argument("--xla-too", action="store_true",
                   help="also time each formulation with pass-jax's CPU kernels off (XLA's ops only)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="write the JSON here too")
    p.set_defaults(func=run)


def one_pass_loss(lookahead, params, cfg, tokens, layout, loss="ce", decay=1.0, target_mask=None, ops=None):
    """The look-ahead loss as one pass over [real tokens, every block], differentiated whole: what
    `training.lookahead_loss` computed before its two-pass split (timed here, and the reference its
    tests compare against; a deep look-ahead's prefix is seen by the block rows only)."""
    import jax
    import jax.numpy as jnp

    from pass_jax.lookahead.leaf import split_lookahead
    from pass_jax.models.cache import KVCache
    from pass_jax.models.contract import params_dtype

    lookahead, prefix = split_lookahead(lookahead)
    positions, mask, target_idx = (jnp.asarray(a) for a in layout.arrays())
    b, n = tokens.shape[0], target_idx.shape[0]
    blocks = jnp.broadcast_to(jnp.tile(lookahead, (n // layout.k, 1)), (b, n, lookahead.shape[1]))
    embeds = jnp.concatenate([cfg.embed(params, tokens, ops), blocks], 1)
    t = embeds.shape[1]
    hidden, _ = cfg.forward(params, embeds, jnp.broadcast_to(positions, (b, t)), jnp.broadcast_to(mask, (b, t, t)),
                        KVCache.create(cfg, b, t, params_dtype(params)), prefix=prefix,
                        prefix_rows=jnp.broadcast_to(jnp.arange(t) >= layout.seq_len, (b, t)), ops=ops)
    student = jax.nn.log_softmax(cfg.logits(params, hidden[:, layout.seq_len:], ops), -1)
    if loss == "ce":
        per = -jnp.take_along_axis(student, tokens[:, target_idx][..., None], -1)[..., 0]
    else:
        teacher = jax.lax.stop_gradient(jax.nn.log_softmax(cfg.logits(params, hidden[:, target_idx - 1], ops),
                                                           -1))
        per = jnp.sum(jnp.exp(teacher) * (teacher - student), -1)
    weight = jnp.broadcast_to(decay ** jnp.tile(jnp.arange(layout.k), n // layout.k), (b, n))
    if target_mask is not None:
        weight = weight * jnp.asarray(target_mask)[:, target_idx]
    return jnp.sum(per * weight) / jnp.sum(weight)


def _time_step(loss_fn, la, params, tokens, repeats: int, real=None) -> float:
    import jax
    import optax

    tx = optax.adamw(1e-2)

    @jax.jit
    def step(la, opt_state, params, tokens, real):
        value, grad = jax.value_and_grad(loss_fn)(la, params, tokens, real)
        updates, opt_state = tx.update(grad, opt_state, la)
        return optax.apply_updates(la, updates), opt_state, value

    state = (la, tx.init(la))
    return _median_seconds(lambda: step(*state, params, tokens, real), repeats)


def _median_seconds(fn, repeats: int) -> float:
    import jax
    import numpy as np

    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from infer.options import with_demo_defaults
    from infer.timing import machine
    from pass_jax import load_model, untrained_lookahead
    from pass_jax.backends import default_ops
    from pass_jax.backends.xla import XLA
    from pass_jax.lookahead.leaf import check_k, init_deep
    from pass_jax.lookahead.training import TrainLayout, lookahead_loss, real_pass

    k = check_k(args.k)
    path = with_demo_defaults(args.model, None)[0]
    rows = []
    for dtype in args.dtypes.split(","):
        model = load_model(path, dtype=dtype)
        cfg, params = model.config, model.params
        la = untrained_lookahead(model, k)
        if args.deep:
            la = init_deep(la, cfg, args.deep)
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch_size, args.seq_len)))
        run_real = jax.jit(lambda p, x, cfg=cfg: real_pass(p, cfg, x))
        real_secs = _median_seconds(functools.partial(run_real, params, tokens), args.repeats)
        kept = run_real(params, tokens)
        for stride in (int(s) for s in args.strides.split(",")):
            layout = TrainLayout(args.seq_len, k, stride, args.points)
            targets = args.batch_size * layout.num_points * k
            two_pass = lambda la, p, x, real, ops, layout=layout, cfg=cfg: lookahead_loss(
                la, p, cfg, x, layout, "ce", real=real, ops=ops)
            runs = {"two_pass": (two_pass, None), "kept_real": (two_pass, kept)}
            if args.single_pass and not args.deep and args.points is None:
                runs["single_pass"] = (lambda la, p, x, real, ops, layout=layout, cfg=cfg: one_pass_loss(
                    la, p, cfg, x, layout, ops=ops), None)
            for (name, (fn, real)), kernels in itertools.product(runs.items(), (True, False) if args.xla_too else (True,)):
                ops = default_ops() if kernels else XLA  # a field of each step's ops: part of its jit key
                secs = _time_step(functools.partial(fn, ops=ops), la, params, tokens, args.repeats, real)
                row = {"dtype": dtype, "stride": stride, "formulation": name, "cpu_kernels": ops.name == "cpu",
                       "seconds_per_step": secs,
                       "tokens_per_second": args.batch_size * args.seq_len / secs,
                       "lookahead_targets_per_second": targets / secs}
                if real is not None:
                    row["real_pass_seconds_per_batch"] = real_secs
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    result = {"model": path, "k": k, "deep": args.deep, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "command": "python -m train " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("__main__.py") else None,
              "machine": machine(), "rows": rows}
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0
