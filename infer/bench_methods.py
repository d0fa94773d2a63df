"""python -m infer bench --suite methods --model M: every decoding method side by side, in one run.

For each dtype, batch size and sampling setting: autoregressive decoding, n-gram drafting (prompt
lookup), PaSS chain (paper, fused), PaSS tree (look-ahead candidates only) and PaSS tree + n-grams.
Every method is warmed up (compiled and run once), then the methods' timed runs over all prompts
alternate (--repeats rounds; each call's fastest time kept, summed over the calls), so none pays
first-execution costs or a slow spell of the machine alone. Speed-ups are over the fastest autoregressive configuration of
this run (any dtype) at the same batch size and sampling setting.
"""

from __future__ import annotations

import sys

import numpy as np


def add_methods_args(p) -> None:
    g = p.add_argument_group("methods suite (--suite methods --model M)")
    g.add_argument("--chat", action="store_true", help="wrap the prompts in the model's chat template")
    g.add_argument("--dtypes", default="float32,bfloat16", help="parameter dtypes to measure")
    g.add_argument("--sampling", default="greedy,t0.8-top10",
                   help="'greedy' and/or 't<T>-top<K>' (the paper's setting: t0.8-top10)")
    g.add_argument("--k", type=int, default=4, help="look-ahead count for the PaSS methods")
    g.add_argument("--tree", default=None, help="tree of 'pass_tree_ngram' (default: pass_jax.decoding.plan.DEFAULT_TREE)")
    g.add_argument("--la-tree", default="3,1", help="tree of 'pass_tree': look-ahead candidates only")
    g.add_argument("--ngram-tree", default="ngram=4;ngram_min=2", help="tree of 'ngram'")
    g.add_argument("--only", default=None, help="comma-separated subset of the methods")


def _sampling(spec: str) -> dict:
    if spec == "greedy":
        return {"temperature": 0.0}
    try:
        t, k = spec[1:].split("-top")
        return {"temperature": float(t), "top_k": int(k)}
    except ValueError:
        raise ValueError(f"--sampling takes 'greedy' or 't<T>-top<K>', got {spec!r}") from None


def methods(args, lookahead) -> dict[str, dict]:
    from pass_jax.decoding.plan import DEFAULT_TREE

    la = {"k": args.k, "lookahead": lookahead}
    table = {
        "ar": {},
        "ngram": {"method": "ngram", "tree": args.ngram_tree},
        "pass_paper": {"method": "pass", "variant": "paper", **la},
        "pass_fused": {"method": "pass", "variant": "fused", **la},
        "pass_tree": {"method": "pass", "variant": "tree", "tree": args.la_tree, **la},
        "pass_tree_ngram": {"method": "pass", "variant": "tree", "tree": args.tree or DEFAULT_TREE.describe(), **la},
    }
    if args.only:
        unknown = set(args.only.split(",")) - set(table)
        if unknown:
            raise ValueError(f"--only: unknown methods {sorted(unknown)}; known: {', '.join(table)}")
        table = {name: kw for name, kw in table.items() if name in args.only.split(",") or name == "ar"}
    return table


def _run(model, ids, batch, pad_to, kw):
    """Generate every prompt in batches: seconds per batch, tokens, passes, outputs and (adaptive drafting)
    the rounds each option took."""
    from pass_jax import generate

    out, secs, new, passes, options = [], [], 0, 0, {}
    for i in range(0, len(ids), batch):
        res = generate(model, ids[i:i + batch], pad_prompts_to=pad_to, eos_token_id=(), **kw)
        out += res.token_ids
        secs.append(res.stats["seconds"])
        new += res.stats["new_tokens"]
        passes += sum(res.stats["row_forward_passes"])
        for name, share in (res.stats.round_options or {}).items():
            options[name] = options.get(name, 0.0) + share * len(res.token_ids) / len(ids)
    return {"token_ids": out, "seconds": secs, "new_tokens": new, "tokens_per_forward": new / max(passes, 1),
            "round_options": options or None}


def _fastest(runs: list[dict]) -> dict:
    """Each batch's fastest time over the repeats (a slow spell of the machine hits one call, not the
    whole run), summed; outputs and counts are the same in every repeat."""
    res = dict(runs[0])
    res["seconds"] = sum(min(times) for times in zip(*(r["seconds"] for r in runs)))
    res["tokens_per_second"] = res["new_tokens"] / res["seconds"]
    return res


def run_methods_bench(args, table_fn=methods) -> dict:
    from tqdm import tqdm

    from pass_jax import load_model
    from pass_jax.api import _tokenize

    from .bench_model import read_prompts
    from .options import resolve_lookahead, with_demo_defaults

    model_path, la_spec = with_demo_defaults(args.model, args.lookahead)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    samplings = args.sampling.split(",")
    dtypes = args.dtypes.split(",")
    rows, outputs = [], {}
    bar = tqdm(total=len(dtypes) * len(batches) * len(samplings), desc="methods bench", unit="setting",
               file=sys.stderr)
    for dtype in dtypes:
        model = load_model(model_path, dtype=dtype, mesh=args.mesh)
        lookahead, args.k = resolve_lookahead(la_spec, model, args.k)
        ids = _tokenize(model, read_prompts(args.prompts), args.chat)
        pad_to = max(map(len, ids))
        table = table_fn(args, lookahead)
        for batch in batches:
            for sampling in samplings:
                kws = {name: {"max_new_tokens": args.new_tokens, "seed": 0, "mesh": args.mesh, **_sampling(sampling),
                              **extra} for name, extra in table.items()}
                for kw in kws.values():
                    _run(model, ids[:batch], batch, pad_to, kw)  # compile and first execution, untimed
                timed = {name: [] for name in kws}
                for _ in range(args.repeats):  # methods in turn, so a slow spell of the machine hits all alike
                    for name, kw in kws.items():
                        timed[name].append(_run(model, ids, batch, pad_to, kw))
                for name, extra in table.items():
                    res = _fastest(timed[name])
                    outputs[dtype, batch, sampling, name] = res["token_ids"]
                    rows.append({"dtype": dtype, "batch": batch, "sampling": sampling, "method": name,
                                 "tree": extra.get("tree"), "k": extra.get("k", 0),
                                 "tokens_per_forward": res["tokens_per_forward"],
                                 "tokens_per_second": res["tokens_per_second"]})
                    if res["round_options"]:
                        rows[-1]["round_options"] = {o: round(x, 3) for o, x in res["round_options"].items()}
                    bar.set_postfix_str(f"{dtype} B={batch} {sampling} {name} "
                                        f"{res['tokens_per_second']:.1f} tok/s")
                bar.update()
    bar.close()
    for row in rows:  # against the fastest autoregressive configuration (any dtype), same batch and sampling
        fastest = max(r["tokens_per_second"] for r in rows if r["method"] == "ar"
                      and (r["batch"], r["sampling"]) == (row["batch"], row["sampling"]))
        row["speedup_vs_fastest_ar"] = row["tokens_per_second"] / fastest
        ar_ids = outputs[row["dtype"], row["batch"], row["sampling"], "ar"]
        mine = outputs[row["dtype"], row["batch"], row["sampling"], row["method"]]
        row["rows_identical_to_ar"] = f"{sum(a == b for a, b in zip(mine, ar_ids))}/{len(ar_ids)}"
    result = {"model": model_path, "lookahead": la_spec, "prompts": args.prompts, "chat": args.chat,
              "n_prompts": len(ids), "rows": rows}
    if args.plot:
        (plot if table_fn is methods else plot_batch)(result, args.plot)
    return result


def batch_methods(args, lookahead) -> dict[str, dict]:
    """The batch suite's methods: autoregressive, n-grams, PaSS (adaptive, the default) and PaSS with the
    whole tree every round (what PaSS did before it adapted)."""
    from pass_jax.decoding.plan import DEFAULT_TREE

    la = {"k": args.k, "lookahead": lookahead, "tree": args.tree or DEFAULT_TREE.describe()}
    return {"ar": {}, "ngram": {"method": "ngram", "tree": args.ngram_tree},
            "pass": {"method": "pass", **la}, "pass_full_tree": {"method": "pass", "pass_costs": None, **la}}


def plot_batch(result: dict, path: str) -> None:
    """Speed-up over the fastest autoregressive configuration against the batch size, a line per method and dtype."""
    from .bench_common import require_extra

    require_extra("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    samplings = list(dict.fromkeys(r["sampling"] for r in rows))
    fig, axes = plt.subplots(1, len(samplings), figsize=(5.5 * len(samplings), 4), squeeze=False)
    for ax, sampling in zip(axes[0], samplings):
        for name in dict.fromkeys(r["method"] for r in rows):
            for dtype in dict.fromkeys(r["dtype"] for r in rows):
                pts = sorted((r["batch"], r["speedup_vs_fastest_ar"]) for r in rows
                             if (r["method"], r["dtype"], r["sampling"]) == (name, dtype, sampling))
                ax.plot(*zip(*pts), marker="o", ls="-" if dtype == "bfloat16" else "--", label=f"{name} {dtype}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(sampling, fontsize=9)
    axes[0][0].set_ylabel("speed-up over the fastest autoregressive run")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{result['model'].rstrip('/').split('/')[-1]}: {result['prompts'].split('/')[-1]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(result: dict, path: str) -> None:
    """Speed-up over the fastest autoregressive configuration, one group of bars per setting."""
    from .bench_common import require_extra

    require_extra("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    settings = sorted({(r["batch"], r["sampling"]) for r in rows})
    names = list(dict.fromkeys(r["method"] for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 4), squeeze=False, sharey=True)
    width = 0.8 / len(dtypes)
    for ax, (batch, sampling) in zip(axes[0], settings):
        for j, dtype in enumerate(dtypes):
            vals = [next((r["speedup_vs_fastest_ar"] for r in rows if (r["batch"], r["sampling"], r["dtype"],
                                                                       r["method"]) == (batch, sampling, dtype, n)),
                         0.0) for n in names]
            ax.bar(np.arange(len(names)) + j * width, vals, width, label=dtype)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(np.arange(len(names)) + width * (len(dtypes) - 1) / 2, names, rotation=40, ha="right",
                      fontsize=8)
        ax.set_title(f"batch {batch}, {sampling}", fontsize=9)
    axes[0][0].set_ylabel("speed-up over the fastest autoregressive run")
    axes[0][0].legend(fontsize=8)
    parts = result["model"].rstrip("/").split("/")
    name = parts[-2] if parts[-1] == "hf" and len(parts) > 1 else parts[-1]  # ~/.cache/pass-jax/smollm2/hf
    fig.suptitle(f"{name}: {result['prompts'].split('/')[-1]}, {result['n_prompts']} prompts", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
