"""python -m infer bench --model DIR: autoregressive vs PaSS on real prompts, side by side in one run.

For every batch size, temperature and k: PaSS fused and paper variants with the trained look-ahead
(the first k rows of the checkpoint: a look-ahead block is causal, so its prefix is a valid smaller
block) and the untrained baseline, against autoregressive decoding of the same prompts. transformers
PyTorch `generate` (greedy and prompt-lookup assisted) gives outside reference points at batch 1.
"""

from __future__ import annotations

import json
import time
from importlib.resources import files
from pathlib import Path

import numpy as np

DEFAULT_PROMPTS = files("infer") / "prompts" / "code.jsonl"  # package data


def add_model_args(p) -> None:
    g = p.add_argument_group("model benchmark (with --model)")
    g.add_argument("--model", help="benchmark this Hugging Face directory instead of a random-config suite")
    g.add_argument("--lookahead", help="trained look-ahead checkpoint (k = its size, or more than every --ks)")
    g.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="JSONL with a 'prompt' field, or a text file "
                   "of prompts separated by blank lines (default: infer/prompts/code.jsonl)")
    g.add_argument("--ks", default="1,2,4,6,8", help="look-ahead counts to measure")
    g.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,8; batch suite 1,2,4,8,16)")
    g.add_argument("--temperatures", default="0,0.8", help="0 = greedy")
    g.add_argument("--plot", help="write a PNG of speed-up and tokens per forward pass against k")


def read_prompts(path: str) -> list[str]:
    text = Path(path).read_text()
    if path.endswith(".jsonl"):
        return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    return [p for p in text.split("\n\n") if p.strip()]


def _run_all(model, ids, batch, pad_to, **kw):
    """Generate for every prompt in batches; total seconds, tokens, passes and the outputs."""
    from pass_jax import generate

    from .timing import warm

    out, secs, new, row_passes, accepted = [], 0.0, 0, 0, []
    for i in range(0, len(ids), batch):
        chunk = ids[i:i + batch]
        res = warm(lambda chunk=chunk: generate(model, chunk, pad_prompts_to=pad_to, eos_token_id=(), **kw))  # never a first run
        out += res.token_ids
        secs += res.stats.seconds
        new += res.stats.new_tokens
        row_passes += sum(res.stats.row_forward_passes)
        accepted.append(res.stats.acceptance_by_position)
    return {"token_ids": out, "seconds": secs, "new_tokens": new, "tokens_per_forward": new / max(row_passes, 1),
            "tokens_per_second": new / secs, "acceptance_by_position": np.mean(accepted, 0).tolist()
            if accepted and accepted[0] else []}


def _torch_reference(model_dir, ids, new_tokens):
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    for name, extra in (("torch_greedy", {}), ("torch_prompt_lookup", {"prompt_lookup_num_tokens": 10})):
        secs, new = 0.0, 0
        for prompt in ids:
            x = torch.tensor([prompt])
            with torch.no_grad():
                ref.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0, **extra)  # warm-up
                t0 = time.perf_counter()
                y = ref.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0, eos_token_id=None, **extra)
                secs += time.perf_counter() - t0
            new += y.shape[1] - len(prompt)
        out[name] = {"tokens_per_second": new / secs}
    return out


def run_model_bench(args) -> dict:
    from tqdm import tqdm

    from pass_jax import load_model
    from pass_jax.io.checkpoint import load_lookahead

    model = load_model(args.model, dtype=args.dtype)
    prompts = read_prompts(args.prompts)
    ids = [model.tokenizer(p)["input_ids"] for p in prompts] if model.tokenizer else [[int(t) for t in p.split()]
                                                                                      for p in prompts]
    pad_to = max(len(p) for p in ids)
    ks = [int(k) for k in args.ks.split(",")]
    trained = load_lookahead(args.lookahead, model) if args.lookahead else None
    if trained is not None and trained.shape[0] < max(ks):
        raise ValueError(f"the look-ahead checkpoint holds k={trained.shape[0]}, less than --ks {max(ks)}")
    configs = [(b, float(t)) for b in map(int, args.batch_sizes.split(",")) for t in args.temperatures.split(",")]
    variants = [("pass_fused", "fused", True), ("pass_paper", "paper", True), ("pass_untrained", "fused", False)]
    if trained is None:
        variants = [v for v in variants if not v[2]]
    jobs = [(b, t, None, None) for b, t in configs] + [(b, t, k, v) for b, t in configs for k in ks for v in variants]
    rows, ar = [], {}
    for batch, temp, k, variant in tqdm(jobs, desc="bench", unit="run"):
        kw = {"max_new_tokens": args.new_tokens, "temperature": temp, "seed": 0}
        if k is None:
            runs = [_run_all(model, ids, batch, pad_to, **kw) for _ in range(args.repeats)]
            ar[batch, temp] = min(runs, key=lambda r: r["seconds"])
            rows.append({"method": "ar", "batch": batch, "temperature": temp, "k": 0, "tokens_per_forward": 1.0,
                         "tokens_per_second": ar[batch, temp]["tokens_per_second"], "speedup": 1.0})
            continue
        name, var, use_trained = variant
        kw.update(method="pass", k=k, variant=var, lookahead=trained[:k] if use_trained else None)
        res = min((_run_all(model, ids, batch, pad_to, **kw) for _ in range(args.repeats)), key=lambda r: r["seconds"])
        base = ar[batch, temp]
        row = {"method": name, "batch": batch, "temperature": temp, "k": k,
               "tokens_per_forward": res["tokens_per_forward"], "tokens_per_second": res["tokens_per_second"],
               "speedup": base["seconds"] / res["seconds"],
               "acceptance_by_position": [round(a, 3) for a in res["acceptance_by_position"]]}
        if temp == 0:
            row["identical_to_ar"] = res["token_ids"] == base["token_ids"]
        rows.append(row)
    result = {"model": args.model, "lookahead": args.lookahead, "prompts": args.prompts, "n_prompts": len(ids),
              "rows": rows}
    if not args.no_torch:
        result["reference"] = _torch_reference(args.model, ids, args.new_tokens)
        result["reference"]["jax_ar_greedy_batch1_tokens_per_second"] = ar.get((1, 0.0), {}).get("tokens_per_second")
    if args.plot:
        plot(result, args.plot)
    return result


def plot(result: dict, path: str) -> None:
    from .bench_common import require_extra

    require_extra("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (batch, temp) in sorted({(r["batch"], r["temperature"]) for r in result["rows"]}):
        for method, style in (("pass_fused", "-o"), ("pass_paper", "--s"), ("pass_untrained", ":^")):
            rows = [r for r in result["rows"] if (r["method"], r["batch"], r["temperature"]) == (method, batch, temp)]
            if not rows:
                continue
            label = f"{method[5:]} B={batch} T={temp:g}"
            ks = [r["k"] for r in rows]
            axes[0].plot(ks, [r["speedup"] for r in rows], style, label=label)
            axes[1].plot(ks, [r["tokens_per_forward"] for r in rows], style, label=label)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set(xlabel="look-ahead tokens k", ylabel="wall-clock speed-up over autoregressive",
                title="PaSS speed-up (same prompts, same run)")
    axes[1].set(xlabel="look-ahead tokens k", ylabel="tokens per forward pass", title="Tokens per forward pass")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
