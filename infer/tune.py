"""python -m infer tune: choose the draft tree by measurement, on this machine, for this model.

1. Probe: decode held-back prompts greedily with a large tree (look-ahead top-c candidates and an
   n-gram chain, a look-ahead block on every node) and count how often each node lay on the
   accepted path. Candidates are deterministic, so whether a node is right hardly depends on
   which other nodes are in the tree: a subtree S accepts about 1 + the sum of its nodes' rates
   tokens per pass. An estimate (a smaller tree moves the round boundaries, and of two equal
   siblings only one is counted): step 4 measures the chosen tree.
2. Cost: time one forward pass over T = 1..64 new tokens at a warm cache on this machine.
3. Choose: for every node budget, the likeliest nodes (a parent is never less likely than its
   child, so they form a tree), with look-ahead blocks on every node when any look-ahead candidate
   is kept; expected tokens per second = expected tokens per pass / cost(T). A chain gated by the
   probe's ngram_min rides along only in the share of rounds that found a match, so it is priced
   at that share of its cost.
4. Measure: decode the prompts at batch 1 autoregressively and with the expected best tree of each
   kind (look-ahead only, n-grams only, both), side by side. The fastest is the answer: the
   estimate misses each round's own work outside the pass (verification, top-k, prompt lookup)
   and counts two sources' equal candidates once, so it ranks kinds less well than trees.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np

COST_TOKENS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def add_parser(sub) -> None:
    import argparse

    from .bench_model import DEFAULT_PROMPTS
    from .options import LOOKAHEAD_HELP, add_dtype

    p = sub.add_parser("tune", help="choose the draft tree by measuring acceptance and pass cost here",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory or .gguf file (default: the embedded demo model)")
    p.add_argument("--lookahead", help=LOOKAHEAD_HELP)
    p.add_argument("--k", type=int, default=None, help="look-ahead count (default: the checkpoint's, else 4)")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="held-back prompts: JSONL with a 'prompt' "
                   "field or a text file of prompts separated by blank lines")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    add_dtype(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--probe", default="6,3,2,1;ngram=8;ngram_min=2",
                   help="the large tree whose nodes are measured (its ngram_min gates every candidate's chain)")
    p.add_argument("--max-nodes", type=int, default=24, help="largest tree considered (nodes, root included)")
    p.add_argument("--finalists", type=int, default=3,
                   help="trees decoded side by side with autoregressive decoding (the expected best of each kind)")
    p.add_argument("--also", action="append", default=[], metavar="TREE",
                   help="decode this tree side by side too (repeatable), e.g. the tree you use now")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each prompt per tree (median)")
    p.add_argument("--out", help="write the JSON result here")
    p.set_defaults(func=run)


def pass_costs(model, context: int, tokens=COST_TOKENS, iters: int = 8) -> dict[int, float]:
    """Seconds per forward pass over T new tokens at a warm cache of `context` entries (median of 3)."""
    from .bench_common import median_time, pass_cost_fn

    return {t: median_time(pass_cost_fn(model, t, 1, context, iters), 3) / iters for t in tokens}


def _cost_at(costs: dict[int, float], t: int) -> float:
    ts = sorted(costs)
    return float(np.interp(t, ts, [costs[x] for x in ts]))


def choose(tree, rates, costs, k: int, max_nodes: int, ngram_share: float = 1.0):
    """(best DraftTree or None for autoregressive, table of candidates): maximize expected tokens/second.

    With a gated chain (tree.ngram_min > 1) the probe's chain rates count only the rounds that drafted
    it, a share `ngram_share` of them; the other rounds run the tree without its chain, at its cost."""
    from pass_jax.decoding.tree import DraftTree

    nodes = list(range(1, tree.num_nodes))
    order = sorted(nodes, key=lambda i: (-rates[i], tree.depth[i], i))  # parents before children on ties
    n_la = len(tree.paths)
    table = [{"tree": "ar", "nodes": 1, "tokens": 1, "expected_tokens_per_pass": 1.0,
              "expected_tokens_per_second": 1 / _cost_at(costs, 1)}]
    for n in range(1, min(max_nodes, tree.num_nodes)):
        chosen = set(order[:n])
        paths = tuple(tree.paths[i - 1] for i in sorted(chosen) if i <= n_la)
        ngram = sum(1 for i in chosen if i > n_la)
        chain = sorted(i - n_la for i in chosen if i > n_la)
        if any(p[:-1] and p[:-1] not in paths for p in paths) or chain != list(range(1, ngram + 1)):
            continue  # not closed under parents (cannot happen: a child is never likelier than its parent)
        cand = DraftTree(paths, ngram, tree.ngram_n, ngram_min=tree.ngram_min if ngram else 1)
        if set(DraftTree.parse(cand.describe()).paths) != set(paths):
            continue  # not a spine with ribs: its printed form would name another tree
        slots = cand.slots_used(k) if paths else 0
        t = cand.num_tokens(slots)
        cost = _cost_at(costs, t)
        if cand.ngram_min > 1:
            cost = ngram_share * cost + (1 - ngram_share) * _cost_at(costs, cand.without_ngram().num_tokens(slots))
        expected = 1 + sum(rates[i] for i in chosen)
        table.append({"tree": cand.describe(), "nodes": n + 1, "tokens": t, "expected_tokens_per_pass": expected,
                      "expected_ms_per_pass": cost * 1e3, "expected_tokens_per_second": expected / cost,
                      "_tree": cand})
    best = max(table, key=lambda r: r["expected_tokens_per_second"])
    return best.get("_tree"), table


def finalists(table, n: int) -> list:
    """The trees worth measuring: the expected best of each kind (look-ahead only, n-grams only, both),
    likeliest first. The estimate ranks trees within a kind well; across kinds it can be off by 50%."""
    best = {}
    for row in sorted(table, key=lambda r: -r["expected_tokens_per_second"]):
        tree = row.get("_tree")
        if tree is not None:
            best.setdefault((bool(tree.paths), bool(tree.ngram)), tree)
    return list(best.values())[:n]


def run(args) -> int:
    from tqdm import tqdm

    from pass_jax import generate, load_model
    from pass_jax.api import _tokenize
    from pass_jax.decoding.plan import DEFAULT_TREE
    from pass_jax.decoding.tree import DraftTree

    from .bench_model import read_prompts
    from .options import resolve_lookahead, with_demo_defaults
    from .timing import machine

    also = [DraftTree.parse(t) for t in args.also]  # a bad tree is an error before any work
    model_path, la_spec = with_demo_defaults(args.model, args.lookahead)
    model = load_model(model_path, dtype=args.dtype)
    lookahead, k = resolve_lookahead(la_spec, model, args.k)
    probe = DraftTree.parse(args.probe)
    if probe.la_depth > k:
        probe = DraftTree.from_widths([sum(1 for p in probe.paths if len(p) == d + 1) for d in range(k)],
                                      probe.ngram, probe.ngram_n, ngram_min=probe.ngram_min)
    prompts = _tokenize(model, read_prompts(args.prompts), args.chat)
    kw = {"max_new_tokens": args.max_new_tokens, "eos_token_id": (), "pad_prompts_to": max(map(len, prompts))}
    bar = tqdm(total=3, desc="tune", file=sys.stderr)
    bar.set_postfix_str("probe")
    res = generate(model, prompts, method="pass", variant="tree", k=k, lookahead=lookahead, tree=probe, **kw)
    rates, share = res.stats.node_acceptance, res.stats.ngram_share
    bar.update()
    bar.set_postfix_str("pass cost")
    context = int(np.mean([len(p) for p in prompts])) + args.max_new_tokens // 2
    costs = pass_costs(model, context)
    bar.update()
    best, table = choose(probe, rates, costs, k, args.max_nodes, 1.0 if share is None else share)
    bar.set_postfix_str("measure")
    runs = {"ar": {"method": "ar"}}
    for tree in [*finalists(table, args.finalists), DEFAULT_TREE, *also]:  # and generate's default, for reference
        runs[tree.describe()] = ({"method": "pass", "variant": "tree", "k": k, "lookahead": lookahead, "tree": tree}
                                 if tree.paths else {"method": "ngram", "tree": tree})
    measured = _measure_side_by_side(model, prompts, runs, kw, args.repeats)
    bar.update()
    bar.close()
    ar = measured["ar"]
    for m in measured.values():
        m.update(speedup=m["tokens_per_second"] / ar["tokens_per_second"], identical_to_ar=m["token_ids"] == ar["token_ids"])
    chosen = max(measured, key=lambda n: measured[n]["tokens_per_second"])
    result = {
        "model": model_path, "dtype": args.dtype, "k": k, "prompts": args.prompts, "probe": probe.describe(),
        "node_rates": {name: rate for name, rate in zip(_node_names(probe), rates)}, "ngram_share": share,
        "pass_ms": {str(t): c * 1e3 for t, c in costs.items()},
        "candidates": [{k2: v for k2, v in r.items() if k2 != "_tree"} for r in table], "expected_best": best.describe() if best is not None else "ar",
        "measured": {n: {k2: v for k2, v in m.items() if k2 != "token_ids"} for n, m in measured.items()},
        "chosen": chosen, "machine": machine(),
        "command": "python -m infer " + shlex.join(sys.argv[1:]) if sys.argv[0].endswith("__main__.py") else None,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    print(f"chosen tree: {result['chosen']!r}  (use --tree with python -m infer generate)", file=sys.stderr)
    return 0


def _measure_side_by_side(model, prompts, runs: dict, kw: dict, repeats: int) -> dict:
    """Each prompt at batch 1 under every run in turn (one untimed round first, to compile and warm up),
    `repeats` times; per run and prompt the median seconds, so slow spells of a shared machine hit all alike."""
    from pass_jax import generate

    secs = {(name, i): [] for name in runs for i in range(len(prompts))}
    out = {}
    for rep in range(repeats + 1):
        for i, p in enumerate(prompts):
            for name, extra in runs.items():
                r = generate(model, [p], **extra, **{**kw, "pad_prompts_to": None})
                if rep:
                    secs[name, i].append(r.stats.seconds)
                out[name, i] = r
    measured = {}
    for name in runs:
        rs = [out[name, i] for i in range(len(prompts))]
        new = sum(r.stats.new_tokens for r in rs)
        measured[name] = {"tokens_per_forward": new / sum(r.stats.forward_passes for r in rs),
                          "tokens_per_second": new / sum(float(np.median(secs[name, i])) for i in range(len(prompts))),
                          "token_ids": [r.token_ids[0] for r in rs]}
    return measured


def _node_names(tree) -> list[str]:
    return (["root"] + ["la" + ".".join(map(str, p)) for p in tree.paths]
            + [f"ngram{t + 1}" for t in range(tree.ngram)])
