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
   is kept; expected tokens per second = expected tokens per pass / cost(T). The best beats
   autoregressive decoding or the answer is autoregressive decoding.
4. Check: decode the prompts with the chosen tree and autoregressively, side by side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

COST_TOKENS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def add_parser(sub) -> None:
    import argparse

    from .bench_model import DEFAULT_PROMPTS
    from .options import LOOKAHEAD_HELP

    p = sub.add_parser("tune", help="choose the draft tree by measuring acceptance and pass cost here",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory or .gguf file (default: the embedded demo model)")
    p.add_argument("--lookahead", help=LOOKAHEAD_HELP)
    p.add_argument("--k", type=int, default=None, help="look-ahead count (default: the checkpoint's, else 4)")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="held-back prompts: JSONL with a 'prompt' "
                   "field or a text file of prompts separated by blank lines")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--probe", default="6,3,2,1;ngram=8", help="the large tree whose nodes are measured")
    p.add_argument("--max-nodes", type=int, default=24, help="largest tree considered (nodes, root included)")
    p.add_argument("--out", help="write the JSON result here")
    p.set_defaults(func=run)


def pass_costs(model, context: int, tokens=COST_TOKENS, iters: int = 8) -> dict[int, float]:
    """Seconds per forward pass over T new tokens at a warm cache of `context` entries (median of 3)."""
    from .bench import _median_time, _pass_cost_fn

    return {t: _median_time(_pass_cost_fn(model, t, 1, context, iters), 3) / iters for t in tokens}


def _cost_at(costs: dict[int, float], t: int) -> float:
    ts = sorted(costs)
    return float(np.interp(t, ts, [costs[x] for x in ts]))


def choose(tree, rates, costs, k: int, max_nodes: int):
    """(best DraftTree or None for autoregressive, table of candidates): maximize expected tokens/second."""
    from pass_jax.tree import DraftTree

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
        cand = DraftTree(paths, ngram, tree.ngram_n)
        if set(DraftTree.parse(cand.describe()).paths) != set(paths):
            continue  # not a spine with ribs: its printed form would name another tree
        t = cand.num_tokens(cand.slots_used(k) if paths else 0)
        expected = 1 + sum(rates[i] for i in chosen)
        table.append({"tree": cand.describe(), "nodes": n + 1, "tokens": t, "expected_tokens_per_pass": expected,
                      "expected_tokens_per_second": expected / _cost_at(costs, t), "_tree": cand})
    best = max(table, key=lambda r: r["expected_tokens_per_second"])
    return best.get("_tree"), [{k: v for k, v in r.items() if k != "_tree"} for r in table]


def run(args) -> int:
    from tqdm import tqdm

    from pass_jax import generate, load_model
    from pass_jax.api import _tokenize
    from pass_jax.tree import DraftTree

    from .bench_model import read_prompts
    from .options import resolve_lookahead, with_demo_defaults

    model_path, la_spec = with_demo_defaults(args.model, args.lookahead)
    model = load_model(model_path, dtype=args.dtype)
    lookahead, k = resolve_lookahead(la_spec, model, args.k)
    probe = DraftTree.parse(args.probe)
    if probe.la_depth > k:
        probe = DraftTree.from_widths([sum(1 for p in probe.paths if len(p) == d + 1) for d in range(k)],
                                      probe.ngram, probe.ngram_n)
    prompts = _tokenize(model, read_prompts(args.prompts), args.chat)
    kw = {"max_new_tokens": args.max_new_tokens, "eos_token_id": (), "pad_prompts_to": max(map(len, prompts))}
    bar = tqdm(total=4, desc="tune", file=sys.stderr)
    bar.set_postfix_str("probe")
    res = generate(model, prompts, method="pass", variant="tree", k=k, lookahead=lookahead, tree=probe, **kw)
    rates = res.stats["node_acceptance"]
    bar.update()
    bar.set_postfix_str("pass cost")
    context = int(np.mean([len(p) for p in prompts])) + args.max_new_tokens // 2
    costs = pass_costs(model, context)
    bar.update()
    best, table = choose(probe, rates, costs, k, args.max_nodes)
    bar.set_postfix_str("check")
    check = {}
    for name, extra in [("ar", {"method": "ar"}),
                        ("tuned", {"method": "pass", "variant": "tree", "k": k, "lookahead": lookahead, "tree": best}
                         if best is not None and best.paths else {"method": "ngram", "tree": best})]:
        if best is None and name == "tuned":
            continue
        for _ in range(2):  # the first run after compiling is slower: keep the second, per prompt at batch 1
            secs, new, passes, ids = 0.0, 0, 0, []
            for p in prompts:
                r = generate(model, [p], **extra, **{**kw, "pad_prompts_to": None})
                secs, new = secs + r.stats["seconds"], new + r.stats["new_tokens"]
                passes += r.stats["forward_passes"]
                ids.append(r.token_ids[0])
        check[name] = {"tokens_per_forward": new / passes, "tokens_per_second": new / secs, "token_ids": ids}
        bar.update()
    bar.close()
    result = {
        "model": model_path, "dtype": args.dtype, "k": k, "prompts": args.prompts, "probe": probe.describe(),
        "node_rates": {name: rate for name, rate in zip(_node_names(probe), rates)},
        "pass_ms": {str(t): c * 1e3 for t, c in costs.items()},
        "candidates": table, "chosen": best.describe() if best is not None else "ar",
        "check": {n: {k2: v for k2, v in c.items() if k2 != "token_ids"} for n, c in check.items()},
    }
    if "tuned" in check:
        result["check"]["speedup"] = check["tuned"]["tokens_per_second"] / check["ar"]["tokens_per_second"]
        result["check"]["identical_to_ar"] = check["tuned"]["token_ids"] == check["ar"]["token_ids"]
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    print(f"chosen tree: {result['chosen']!r}  (use --tree with python -m infer generate)", file=sys.stderr)
    return 0


def _node_names(tree) -> list[str]:
    return (["root"] + ["la" + ".".join(map(str, p)) for p in tree.paths]
            + [f"ngram{t + 1}" for t in range(tree.ngram)])
