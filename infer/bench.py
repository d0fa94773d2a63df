"""python -m infer bench: decode speed on random LLaMA configs, side by side in one run.

Suites (each writes JSON to --out and prints a table):
  decode    autoregressive ms/token at B=1 and B=8 beside transformers PyTorch generate on the same
            weights; the 1-token step of the largest model against its weight-streaming floor; compile time.
  passes    cost of one forward pass over T = 1, 2, 4, 6, 8, 12, 16 new tokens with a warm cache, as a
            ratio to the 1-token pass (what PaSS's speed-up rests on).
  overhead  PaSS with untrained look-ahead (almost nothing accepted) against autoregressive decoding:
            wall time per token, the loop's overhead.
  methods   with --model: autoregressive, ngram, PaSS chain (paper, fused), tree and tree + ngram on
            real prompts, per dtype, batch size and sampling setting (infer/bench_methods.py).
  speed     --model M (or --models presets), per --dtypes: batch-1 autoregressive ms/token beside transformers
            and the weight-streaming floor ("rows"), and the cost of a pass over T = 1..64 tokens with a
            warm cache of 256 as a ratio to the fastest 1-token pass of any dtype ("passes").
  matrices  --model M (or --models), at --dtype: where a pass's time goes for T = 1..16 tokens: the
            layer matrices as a dependent chain and as independent products, the head, the whole pass
            (infer/bench_matrices.py).
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

from .bench_common import log_row, median_time, model_loaders, pass_ms, presets, random_model, stream_rate
from .bench_matrices import suite_matrices
from .timing import machine


def add_parser(sub) -> None:
    from .options import add_dtype

    p = sub.add_parser("bench", help="benchmark decoding on random LLaMA configs", description=__doc__,
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["decode", "passes", "overhead", "methods", "batch", "speed", "matrices"],
                   default="decode",
                   help="methods: every decoding method on --model's prompts (see its options below); batch: "
                   "autoregressive, n-gram and PaSS (adaptive, and with the whole tree) at --batch-sizes; speed: "
                   "batch-1 decoding against its floor and pass cost by T, per --dtypes, on --model or --models")
    p.add_argument("--method", choices=["ar"], default="ar", help="decode suite: the method measured (ar)")
    p.add_argument("--models", default=None, help="comma-separated presets from infer/data/models.yaml, e.g. "
                   "35m,120m or tiny (default per suite: decode 7m,35m,120m; passes 35m,120m; overhead 12m,35m,120m; speed 120m)")
    add_dtype(p)
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per timed run (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is kept (model and methods suites: the fastest)")
    p.add_argument("--no-torch", action="store_true", help="decode and speed suites: skip the PyTorch reference")
    p.add_argument("--out", help="write the JSON results here")
    p.add_argument("--mesh", default=None, help="DATA,MODEL device mesh for the decode and methods suites, e.g. 2,4 "
                   "(batches rounded up to multiples of DATA; pass_jax/sharding.py). Default: one device")
    from .bench_model import add_model_args

    add_model_args(p)
    from .bench_methods import add_methods_args

    add_methods_args(p)
    p.set_defaults(func=run)


def _prompts(batch: int, vocab: int, length: int = 16) -> list[list[int]]:
    return np.random.default_rng(0).integers(0, vocab, (batch, length)).tolist()


def torch_device() -> str:
    """Where the PyTorch reference runs: the GPU when JAX runs on one too, so both sides share a machine."""
    import jax
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _torch_ms_per_token(model, prompts, new_tokens: int, repeats: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from pass_jax import save_model

    device = torch_device()
    with tempfile.TemporaryDirectory() as d:
        save_model(model, d)
        ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32 if model.dtype == "float32"
                                                   else torch.bfloat16).eval().to(device)
    ids = torch.tensor(prompts, device=device)

    def run():
        with torch.no_grad():
            ref.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
        if device == "cuda":
            torch.cuda.synchronize()

    run()
    return median_time(run, repeats) / new_tokens * 1e3


def _floor_ms(model, rate: float) -> float:
    """The weight-streaming floor of a 1-token step: every weight read once at the params' dtype, except
    an untied input embedding (a gather reads one row of it; a tied one is read whole by the head)."""
    cfg = model.config
    n = cfg.num_params - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    return n * np.dtype(model.dtype).itemsize / rate * 1e3


def _ar_ms_per_token(model, prompts, args, mesh=None, max_len=None) -> tuple[float, float]:
    """(median ms/token of --repeats greedy runs of --new-tokens after a warm-up, its compile seconds);
    max_len: the KV cache buffer's slots (default: what the request needs)."""
    from pass_jax import generate

    kw = {"max_new_tokens": args.new_tokens, "eos_token_id": (), "mesh": mesh, "max_len": max_len}
    first = generate(model, prompts, **kw)
    secs = np.median([generate(model, prompts, **kw).stats["seconds"] for _ in range(args.repeats)])
    return secs / args.new_tokens * 1e3, first.stats["compile_seconds"]


def suite_decode(args, names):
    rows, rate = [], stream_rate()
    mesh, data = args.mesh, args.mesh.shape["data"] if args.mesh else 1
    for name in names:
        model = random_model(name, args.dtype)
        if mesh is not None:  # placed once by the rules, not on every call
            from pass_jax.sharding import shard_params

            model.params = shard_params(model.params, model.config, mesh)
        for batch in sorted({-(-b // data) * data for b in (1, 8)}):
            prompts = _prompts(batch, model.config.vocab_size)
            ms, compile_s = _ar_ms_per_token(model, prompts, args, mesh)
            row = {"model": name, "params_m": model.config.num_params / 1e6, "batch": batch,
                   "jax_ms_per_token": ms, "compile_seconds": compile_s}
            if not args.no_torch:
                row["torch_ms_per_token"] = _torch_ms_per_token(model, prompts, args.new_tokens, args.repeats)
                row["speedup_vs_torch"] = row["torch_ms_per_token"] / row["jax_ms_per_token"]
            if batch == 1 and args.dtype == "float32":  # bf16 products are not bound by streaming
                row["floor_ms"] = _floor_ms(model, rate)
                row["ratio_to_floor"] = row["jax_ms_per_token"] / row["floor_ms"]
            rows.append(row)
            log_row(row)
    return {"stream_rate_gb_s": rate / 1e9, "rows": rows}


def suite_passes(args, names):
    rows = []
    for name in names:
        model = random_model(name, args.dtype)
        base = None
        for t in (1, 2, 4, 6, 8, 12, 16):
            ms = pass_ms(model, t, args.repeats)
            base = base or ms
            row = {"model": name, "tokens": t, "ms_per_pass": ms, "ratio_to_1_token": ms / base}
            rows.append(row)
            log_row(row)
    return {"context": 256, "batch": 1, "rows": rows}


def suite_overhead(args, names):
    from pass_jax import generate

    rows = []
    for name in names:
        model = random_model(name, args.dtype)
        prompts = _prompts(1, model.config.vocab_size)
        for k in (2, 4, 8):
            runs = {}
            for method in ("ar", "pass"):
                kw = {"max_new_tokens": args.new_tokens, "eos_token_id": (), "method": method, "k": k}
                generate(model, prompts, **kw)
                runs[method] = [generate(model, prompts, **kw).stats for _ in range(args.repeats)]
            ar = np.median([s["seconds"] for s in runs["ar"]])
            ps = np.median([s["seconds"] for s in runs["pass"]])
            passes = {m: runs[m][0]["forward_passes"] for m in runs}
            row = {"model": name, "k": k, "ar_ms_per_token": ar / args.new_tokens * 1e3,
                   "pass_ms_per_token": ps / args.new_tokens * 1e3, "pass_over_ar_per_token": ps / ar,
                   "pass_tokens_per_forward": runs["pass"][0]["tokens_per_forward"],
                   # the per-token ratio if nothing were accepted: PaSS's cost per pass over AR's
                   "pass_over_ar_per_pass": (ps / passes["pass"]) / (ar / passes["ar"])}
            rows.append(row)
            log_row(row)
    return {"rows": rows}


SPEED_TOKENS = (1, 2, 4, 8, 16, 32, 64)


LONG_CACHE = 2048


def suite_speed(args, names):
    rows, passes, rate = [], [], stream_rate()
    for name, load in model_loaders(args, names):
        for dtype in args.dtypes.split(","):
            model = load(dtype)
            prompts = _prompts(1, model.config.vocab_size)
            ms, compile_s = _ar_ms_per_token(model, prompts, args)
            row = {"model": name, "dtype": dtype, "params_m": model.config.num_params / 1e6,
                   "jax_ms_per_token": ms, "compile_seconds": compile_s}
            if not args.no_torch:
                row["torch_ms_per_token"] = _torch_ms_per_token(model, prompts, args.new_tokens, args.repeats)
                row["speedup_vs_torch"] = row["torch_ms_per_token"] / ms
                row["torch_device"] = torch_device()
            row["floor_ms"] = _floor_ms(model, rate)
            row["ratio_to_floor"] = ms / row["floor_ms"]
            # a long conversation's buffer: every pass writes into it, so a write must not cost its length
            row["long_cache_slots"] = min(LONG_CACHE, model.config.max_position_embeddings)
            row["jax_ms_per_token_long_cache"] = _ar_ms_per_token(model, prompts, args, max_len=row["long_cache_slots"])[0]
            rows.append(row)
            log_row(row)
            for t in SPEED_TOKENS:
                passes.append({"model": name, "dtype": dtype, "tokens": t, "ms_per_pass": pass_ms(model, t, args.repeats)})
                log_row(passes[-1])
        fastest = min(r["ms_per_pass"] for r in passes if r["model"] == name and r["tokens"] == 1)
        for r in passes:  # the goal: a 16-token pass within 1.3x of the fastest 1-token pass, any dtype
            if r["model"] == name:
                r["ratio_to_fastest_1_token"] = r["ms_per_pass"] / fastest
    # "dtype" replaces the header's --dtype: every row names its own
    return {"dtype": args.dtypes, "stream_rate_gb_s": rate / 1e9, "context": 256, "batch": 1, "rows": rows,
            "passes": passes}


SUITES = {"decode": (suite_decode, "llama-7m,llama-35m,llama-120m"),
          "passes": (suite_passes, "llama-35m,llama-120m"),
          "overhead": (suite_overhead, "llama-12m,llama-35m,llama-120m"),
          "speed": (suite_speed, "llama-120m"),
          "matrices": (suite_matrices, "llama-120m")}


def run(args) -> int:

    from pass_jax.sharding import parse_mesh

    mesh_arg, args.mesh = args.mesh, parse_mesh(args.mesh)
    if args.batch_sizes is None:
        args.batch_sizes = "1,2,4,8,16" if args.suite == "batch" else "1,8"
    if args.suite in ("methods", "batch"):
        from .bench_methods import batch_methods, methods, run_methods_bench

        table = batch_methods if args.suite == "batch" else methods
        fn, default = (lambda a, _names: run_methods_bench(a, table)), ""
    elif args.model and args.suite not in ("speed", "matrices"):
        from .bench_model import run_model_bench

        fn, default = (lambda a, _names: run_model_bench(a)), ""
    else:
        fn, default = SUITES[args.suite]
    names = [n if n in presets() or n.startswith("llama-") else f"llama-{n}" for n in (args.models or default).split(",")
             if n]
    unknown = [n for n in names if n not in presets()]
    if unknown:
        raise ValueError(f"unknown model presets {unknown}; known: {', '.join(presets())}")
    result = {"suite": "model" if args.model and args.suite not in ("methods", "batch", "speed", "matrices")
              else args.suite,
              "dtype": args.dtype, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "command": "python -m infer " + shlex.join(sys.argv[1:]) if sys.argv[0].endswith("__main__.py") else None,
              "machine": machine(mesh=mesh_arg),
              **fn(args, names)}
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0
