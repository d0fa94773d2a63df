"""python -m train sweep: train look-ahead recipe variants and score each on held-back prompts.

--recipes YAML: {base: {train lookahead options}, variants: [{name: ..., <options overriding base>}, ...]}.
Each variant trains into OUT/<name> (a killed sweep resumes: finished variants are kept, an unfinished
one continues from its checkpoint), then `eval-lookahead`'s diagnostics score it on --prompts, which no
variant trains on: top-1/5/10 agreement by look-ahead position and the expected tokens per forward of
chain drafting for every k in --ks (a look-ahead block is causal, so the first k of a trained leaf are a
valid k-block), and with --tree those of a tree's look-ahead candidates. The untrained baselines (the
UNK-like token, the mean embedding) and the ceiling come first. Writes OUT/sweep.json and a markdown
table OUT/sweep.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SELF_DATA_KEYS = ("data", "self_prompts", "self_samples", "self_temperature", "seq_len", "chat", "seed")


def add_parser(sub) -> None:
    from infer.bench_model import DEFAULT_PROMPTS

    p = sub.add_parser("sweep", help="train look-ahead recipe variants and compare them on held-back prompts",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", required=True, help="YAML of a base recipe and its variants")
    p.add_argument("--model", help="base model (default: the embedded demo model)")
    p.add_argument("--out", required=True, help="directory of the variants' runs and the results")
    p.add_argument("--prompts", nargs="+", default=[str(DEFAULT_PROMPTS)], help="held-back evaluation prompts "
                   "(JSONL/text; default: infer/prompts/code.jsonl)")
    p.add_argument("--chat-prompts", nargs="+", default=[], help="more held-back prompts, wrapped in the tokenizer's "
                   "chat template (instruct models)")
    p.add_argument("--ks", default="1,2,4", help="chain lengths to score (default 1,2,4)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="greedy continuation per evaluation prompt")
    p.add_argument("--ceiling-depth", type=int, default=2)
    p.add_argument("--tree", help="also score tree drafting with these look-ahead widths, e.g. 3,1 (the top 3 of "
                   "look-ahead 1, the top 1 of look-ahead 2)")
    p.add_argument("--rescore", action="store_true", help="score the baselines and every variant again (after "
                   "changing --prompts or --tree); finished variants are not retrained")
    p.add_argument("--only", nargs="+", help="run only these variants (default: all)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def _train(model_dir: str, out: Path, options: dict, quiet: bool) -> float:
    """Train one variant (resuming where it stopped); seconds of training summed over its sittings."""
    from . import lookahead
    from .common import run_command

    done = out / "lookahead.json"
    if not done.is_file():
        argv = ["lookahead", "--model", model_dir, "--out", str(out)]
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value is not False and value is not None:
                argv += [flag, *map(str, value if isinstance(value, list) else [value])]
        if (out / "checkpoints").is_dir():
            argv.append("--resume")
        if quiet:
            argv.append("--quiet")
        try:
            failed = run_command((lookahead,), argv) != 0
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"training variant {out.name}: {e}") from e
        if failed:
            raise ValueError(f"training variant {out.name} failed (see above)")
    meta = json.loads(done.read_text())
    return float(meta.get("train_seconds_total", meta.get("train_seconds_this_run", 0.0)))


def run(args) -> int:
    import yaml

    from infer.bench_model import read_prompts
    from infer.options import with_demo_defaults
    from pass_jax import generate, load_model, untrained_lookahead
    from pass_jax.api import _tokenize
    from pass_jax.io.checkpoint import load_lookahead
    from pass_jax.lookahead.diagnostics import evaluate
    from pass_jax.lookahead.leaf import init_lookahead
    from pass_jax.models.contract import embed_scale

    spec = yaml.safe_load(Path(args.recipes).read_text()) or {}
    base, variants = spec.get("base", {}), spec.get("variants", [])
    if not variants or any("name" not in v for v in variants):
        raise ValueError(f"{args.recipes}: needs a 'variants' list, each with a 'name'")
    ks = sorted({int(k) for k in args.ks.split(",")})
    model_dir, _ = with_demo_defaults(args.model, None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "sweep.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    model = load_model(model_dir)
    ids = [p for path in args.prompts for p in _tokenize(model, read_prompts(path))]
    ids += [p for path in args.chat_prompts for p in _tokenize(model, read_prompts(path), chat=True)]
    cont = generate(model, ids, max_new_tokens=args.max_new_tokens, eos_token_id=()).token_ids

    widths = tuple(int(w) for w in args.tree.split(",")) if args.tree else None
    if widths and (len(widths) > ks[-1] or min(widths) < 1):
        raise ValueError(f"--tree takes up to {ks[-1]} positive widths (the largest of --ks), got {args.tree!r}")

    def score(la, ceiling: bool) -> dict:
        row = {"by_k": {}}
        for k in ks:
            if k > la.shape[0]:
                continue
            last = k == min(ks[-1], la.shape[0])
            res = evaluate(model.params, model.config, la[:k], ids, cont, widths=widths if last else None,
                           ceiling_depth=args.ceiling_depth if ceiling and k == ks[-1] else 0)
            row["by_k"][str(k)] = res["chain"]["joint"]
            if last:
                row.update(top1=res["top1"], top5=res["top5"], top10=res["top10"], points=res["points"])
                if widths:
                    row["tree"] = {"widths": list(widths), "tokens_per_forward": res["tree"]["joint"]}
                if ceiling:
                    row["ceiling"] = res["ceiling"]
        return row

    if args.rescore:
        if args.only:
            raise ValueError("--rescore scores every variant again: it does not go with --only")
        results = {}
    if "untrained" not in results:
        results["untrained"] = {**score(untrained_lookahead(model, ks[-1]), ceiling=True), "train_seconds": 0.0}
        results_path.write_text(json.dumps(results, indent=2))
    if "untrained mean embedding" not in results:  # the start of `--init mean` runs
        mean_start = init_lookahead(model.params, ks[-1], "mean", embed_scale=embed_scale(model.config))
        results["untrained mean embedding"] = {**score(mean_start, ceiling=False), "train_seconds": 0.0}
        results_path.write_text(json.dumps(results, indent=2))
    generated: dict = {}  # self-data settings -> the rows a first variant generated: the others reuse them
    for variant in variants:
        name = variant["name"]
        options = {**base, **{k: v for k, v in variant.items() if k != "name"}}
        data_key = json.dumps([options.get(key) for key in SELF_DATA_KEYS])
        if (out / name / "self_data.npz").is_file():
            generated.setdefault(data_key, str(out / name / "self_data.npz"))
        if (args.only and name not in args.only) or name in results:  # --rescore emptied results
            continue
        if "lookahead" in options:  # score an existing checkpoint (e.g. the one a previous recipe shipped)
            la, seconds = load_lookahead(options["lookahead"], model), None
        else:
            if data_key in generated and "self_data" not in options:
                options["self_data"] = generated[data_key]
            print(f"== {name}: {options}", file=sys.stderr)
            seconds = _train(model_dir, out / name, options, args.quiet)
            if (out / name / "self_data.npz").is_file():
                generated.setdefault(data_key, str(out / name / "self_data.npz"))
            la = load_lookahead(out / name, model)
        results[name] = {**score(la, ceiling=False), "train_seconds": seconds, "recipe": options}
        results_path.write_text(json.dumps(results, indent=2))
    (out / "sweep.md").write_text(table(results, ks))
    print(table(results, ks))
    return 0


def table(results: dict, ks) -> str:
    ceiling = results.get("untrained", {}).get("ceiling", [])
    trees = {tuple(r["tree"]["widths"]) for r in results.values() if "tree" in r}
    tree = trees.pop() if len(trees) == 1 else None  # one tree column when every scored row used one tree
    head = (["recipe"] + [f"tok/fwd k={k}" for k in ks] + ([f"tok/fwd tree {','.join(map(str, tree))}"] if tree else [])
            + ["top-1 by look-ahead", "top-10 by look-ahead", "train s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = [name] + [f"{r['by_k'][str(k)]:.3f}" if str(k) in r["by_k"] else "-" for k in ks]
        if tree:
            same = "tree" in r and tuple(r["tree"]["widths"]) == tree
            cells.append(f"{r['tree']['tokens_per_forward']:.3f}" if same else "-")
        cells += [" / ".join(f"{x:.2f}" for x in r.get("top1", [])), " / ".join(f"{x:.2f}" for x in r.get("top10", [])),
                  "-" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if ceiling:
        lines.append(f"\nCeiling of a single-pass drafter (top-1, look-aheads 1..{len(ceiling)}): "
                     + " / ".join(f"{x:.2f}" for x in ceiling))
    return "\n".join(lines) + "\n"
