"""python -m train eval-lookahead: how well look-ahead embeddings predict the model's own greedy continuation.

Each prompt is continued greedily by the base model; then at every insertion point t along the
continuation, look-ahead i's logits are compared with the model's greedy token at t+1+i (the token
greedy PaSS must draft), without decoding. Columns:
  top-1 / top-5 / top-10  how often that token is among look-ahead i's best 1 / 5 / 10
  ceiling                 how often argmax of the model's own distribution of token t+1+i given x_<=t
                          (marginalized over a top --beam beam of intermediate paths) is that token:
                          what a look-ahead matching the model's distribution would score at top-1
  points                  insertion points scored
and the expected tokens per forward pass of chain drafting (widths 1,...,1) and of tree drafting with
--tree widths: "indep." from the agreements assuming independent acceptance across positions, "joint"
counted point by point. Table on stdout, JSON with --out, progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub) -> None:
    from infer.bench_model import DEFAULT_PROMPTS
    from infer.options import LOOKAHEAD_HELP, add_dtype

    p = sub.add_parser("eval-lookahead", help="measure look-ahead agreement with the model's greedy continuation",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base model: Hugging Face directory or .gguf file (default: the embedded demo model)")
    p.add_argument("--lookahead", help=LOOKAHEAD_HELP)
    p.add_argument("--k", type=int, help="score the first K look-aheads (default: all of the checkpoint, 4 untrained)")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="JSONL with a 'prompt' field, or a text file of "
                   "prompts separated by blank lines (default: infer/prompts/code.jsonl)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy continuation length per prompt")
    p.add_argument("--tree", help="look-ahead widths of the tree to estimate, e.g. 4,2,1 (default: the decoder's)")
    p.add_argument("--ceiling-depth", type=int, default=2, help="ceiling for look-aheads 1..N (0: skip; each costs "
                   "a pass of --beam branches per point)")
    p.add_argument("--beam", type=int, default=8, help="intermediate paths enumerated for the ceiling")
    p.add_argument("--batch-size", type=int, default=4)
    add_dtype(p, help="base weight dtype (default float32)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(res: dict) -> str:
    rows = [f"{'look-ahead':>10} {'top-1':>6} {'top-5':>6} {'top-10':>6} {'ceiling':>7} {'points':>6}"]
    for i in range(res["k"]):
        ceil = res["ceiling"][i] if i < len(res["ceiling"]) else None
        rows.append(f"{i + 1:>10} {_fmt(res['top1'][i]):>6} {_fmt(res['top5'][i]):>6} {_fmt(res['top10'][i]):>6} "
                    f"{_fmt(ceil):>7} {res['points'][i]:>6}")
    for name in ("chain", "tree"):
        if name in res:
            e = res[name]
            rows.append(f"{name} {','.join(map(str, e['widths']))}: {e['independent']:.3f} tokens/forward (indep.), "
                        f"{_fmt(e['joint'])} (joint)")
    return "\n".join(rows)


def run(args) -> int:
    from tqdm import tqdm

    from infer.bench_model import read_prompts
    from infer.options import check_k_arg, resolve_lookahead, with_demo_defaults
    from pass_jax import generate, load_model, untrained_lookahead
    from pass_jax.api import _tokenize
    from pass_jax.decoding.plan import DEFAULT_TREE
    from pass_jax.lookahead.diagnostics import evaluate, tree_widths

    check_k_arg(args.k)
    if args.max_new_tokens < 2 or args.beam < 1 or args.ceiling_depth < 0 or args.batch_size < 1:
        raise ValueError("need --max-new-tokens >= 2, --beam >= 1, --ceiling-depth >= 0 and --batch-size >= 1")
    widths = tree_widths(args.tree or DEFAULT_TREE)
    model_dir, spec = with_demo_defaults(args.model, args.lookahead)
    model = load_model(model_dir, dtype=args.dtype)
    la, k = resolve_lookahead(spec, model, args.k)
    la = untrained_lookahead(model, k) if la is None else la
    ids = _tokenize(model, read_prompts(args.prompts), chat=args.chat)
    print(f"greedy continuations of {len(ids)} prompts ({args.max_new_tokens} tokens each)...", file=sys.stderr)
    cont = generate(model, ids, max_new_tokens=args.max_new_tokens, eos_token_id=()).token_ids
    with tqdm(total=len(ids), desc="eval-lookahead", unit="prompt", file=sys.stderr, disable=args.quiet) as bar:
        res = evaluate(model.params, model.config, la, ids, cont, widths=widths, ceiling_depth=args.ceiling_depth,
                       beam=args.beam, batch_size=args.batch_size, progress=bar.update)
    res = {"model": model_dir, "lookahead": spec, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
           "beam": args.beam, **res}
    print(table(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0
