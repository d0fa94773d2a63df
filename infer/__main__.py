"""python -m infer generate|bench|humaneval — see `--help` of each."""

from __future__ import annotations

import argparse
import json
import os
import sys

# transformers (tokenizers only, here) would tell every user without PyTorch that its models are
# unavailable; its errors still show. Set before anything imports it; TRANSFORMERS_VERBOSITY overrides.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pass_jax.errors import CacheOverflowError, ConfigError


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None


def _generate_parser(sub) -> None:
    from pass_jax.backends import BACKENDS
    from pass_jax.decoding.methods import METHOD_NAMES, VARIANTS
    from pass_jax.models import ARCHITECTURES

    from .options import LOOKAHEAD_HELP, add_dtype
    architectures = ", ".join(name.removesuffix("ForCausalLM") for name in ARCHITECTURES)
    p = sub.add_parser("generate", help="generate text with autoregressive decoding or PaSS",
                       description="Generate continuations of one or more prompts. With --json, stdout is one JSON "
                                   "object (method, k, texts, token_ids, stats); logs go to stderr.")
    p.add_argument("--model", help=f"Hugging Face model directory ({architectures}), a llama .gguf file, 'smollm2', or "
                   "a hub id where a hub is reachable; default: the embedded demo code model")
    p.add_argument("--method", choices=METHOD_NAMES, default="pass",
                   help="ar: autoregressive decoding; pass: PaSS look-ahead drafting (default); ngram: drafts "
                        "from the prompt and output (prompt lookup), no look-ahead; speculative: classic two-model "
                        "speculative sampling with --draft-model")
    p.add_argument("--draft-model", help="draft model directory for --method speculative (same tokenizer)")
    p.add_argument("--k", type=int, default=None,
                   help="look-ahead tokens per pass, 1..16 (default: the look-ahead checkpoint's k, else 4)")
    p.add_argument("--lookahead", default=None,
                   help=LOOKAHEAD_HELP)
    p.add_argument("--variant", choices=VARIANTS, default="tree",
                   help="tree: a tree of look-ahead and n-gram candidates verified in one pass per round "
                        "(default); fused: the paper's chain, drafts ride along in the verification pass; "
                        "paper: the paper's chain with separate drafting passes")
    p.add_argument("--tree", default=None,
                   help="candidate tree for --variant tree and --method ngram: look-ahead widths per depth, then "
                        "options, e.g. '3,1;ngram=4' (top-3 of look-ahead 1, top-1 of look-ahead 2 under the "
                        "best, plus a 4-token n-gram chain), ';blocks=B' to put look-ahead blocks on the B "
                        "likeliest nodes only, ';ngram_min=N' to draft an n-gram only after a match of N+ tokens "
                        "(rounds without one skip the chain); 'ngram=4' alone for --method ngram (defaults, the fastest "
                        "measured: '1;ngram=4;ngram_min=2' for pass, 'ngram=4;ngram_min=2' for ngram)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template as a "
                   "user message (instruct models)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    g.add_argument("--prompt-ids", type=_ids, action="append", help='token ids "1,2,3" (repeat for a batch)')
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    add_dtype(p, help="parameter dtype. float32 keeps greedy PaSS token-identical to autoregressive decoding; "
                 "bfloat16 halves the weights read per token (on an AVX-512 CPU ~1.25x faster with "
                 "pass-jax's kernel) and may leave it where two logits nearly tie")
    p.add_argument("--max-len", type=int, help="KV cache size (default: what the request needs)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="the ops a pass runs: xla (what TPUs and GPUs run), cpu (pass-jax's kernels, one x86-64 "
                        "AVX-512 CPU device), auto (default: cpu where the kernels build and serve, else xla)")
    p.add_argument("--drafting", choices=["adaptive", "full"], default="adaptive",
                   help="--variant tree and --method ngram: adaptive (default) chooses each round's drafting (an "
                        "autoregressive step, the n-gram chain, the look-ahead tree, or all of it) from what a pass "
                        "of that size costs on this machine, measured once per model, dtype and batch size and "
                        "cached in ~/.cache/pass-jax/pass_costs.json; full runs the whole tree every round")
    p.add_argument("--allow-long", action="store_true", help="run a request past the model's "
                   "max_position_embeddings with a warning instead of an error")
    p.add_argument("--compare", action="store_true",
                   help="also decode autoregressively and report the speed-up (JSON key 'autoregressive'); each "
                        "method is warmed up, then the two alternate and the medians of 3 runs are reported")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    add_mesh_args(p)
    p.add_argument("--coordinator", help="multi-process: coordinator address HOST:PORT (jax.distributed); run the "
                   "same command on every host with its --process-id; 'auto' on a TPU pod slice (jax finds the hosts)")
    p.add_argument("--num-processes", type=int, default=1, help="multi-process: how many processes in all")
    p.add_argument("--process-id", type=int, default=0, help="multi-process: this process's index (0 prints)")


def add_mesh_args(p) -> None:
    p.add_argument("--mesh", default=None, help="DATA,MODEL device mesh, e.g. 2,4: prompts split over DATA devices "
                   "(the batch must be a multiple of DATA), attention heads, MLP hidden and vocabulary over MODEL "
                   "(pass_jax/sharding.py); weights are read shard by shard. Default: one device")


def run_generate(args) -> int:
    from pass_jax.sharding import init_distributed, parse_mesh

    init_distributed(args.coordinator, args.num_processes, args.process_id)  # before anything touches devices
    import jax

    from pass_jax import generate, load_model

    from .options import check_k_arg, resolve_k, resolve_lookahead, with_demo_defaults

    check_k_arg(args.k)
    args.model, args.lookahead = with_demo_defaults(args.model, args.lookahead)
    mesh = parse_mesh(args.mesh)
    model = load_model(args.model, dtype=args.dtype, mesh=mesh)
    prompts = args.prompt if args.prompt else args.prompt_ids
    lookahead = None
    if args.method == "pass":
        lookahead, args.k = resolve_lookahead(args.lookahead, model, args.k)
    args.k = resolve_k(args.k)
    draft = None
    if args.method == "speculative":
        if not args.draft_model:
            raise ValueError("--method speculative needs --draft-model DIR")
        draft = load_model(args.draft_model, dtype=args.dtype, tokenizer=False, mesh=mesh)
    common = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
              "top_p": args.top_p, "seed": args.seed, "max_len": args.max_len, "chat": args.chat,
              "allow_long": args.allow_long, "mesh": mesh, "backend": args.backend}
    drafting = {"pass_costs": "auto" if args.drafting == "adaptive" else None} if args.method in ("pass", "ngram") \
        else {}

    def run():
        return generate(model, prompts, method=args.method, k=args.k, lookahead=lookahead, variant=args.variant,
                        draft_model=draft, tree=args.tree, **drafting, **common)

    k = args.k if args.method != "ar" else 0
    ar = None
    if args.compare and args.method != "ar":  # both warmed up, then alternated: medians of 3 each
        from .timing import alternate_medians

        timed = alternate_medians({"method": run, "ar": lambda: generate(model, prompts, **common)})
        res, ar = timed["method"], timed["ar"]
    else:
        res = run()
    if jax.process_index() != 0:  # every process ran the same program and holds every row; one prints
        return 0
    if args.json:
        out = {"method": args.method, "k": k, "texts": res.texts, "token_ids": res.token_ids,
               "stats": res.stats.to_dict()}
        if ar is not None:
            out["autoregressive"] = {"token_ids": ar.token_ids, "stats": ar.stats.to_dict(),
                                     "speedup": ar.stats.seconds / res.stats.seconds}
        print(json.dumps(out))
        return 0
    for i, ids in enumerate(res.token_ids):
        body = res.texts[i] if res.texts is not None else " ".join(map(str, ids))
        print(f"--- completion {i} ---\n{body}")
    s = res.stats
    print(f"[{args.method}{f' k={k}' if k else ''}] {s.new_tokens} tokens, {s.forward_passes} forward passes, "
          f"{s.tokens_per_forward:.2f} tokens/pass, {s.tokens_per_second:.1f} tokens/s "
          f"(compile {s.compile_seconds:.1f} s)")
    if s.round_options is not None:
        print("[drafting] rounds: " + ", ".join(f"{name} {share:.0%}" for name, share in s.round_options.items()))
    if ar is not None:
        same = "identical output" if ar.token_ids == res.token_ids else "output differs (sampling)"
        print(f"[ar] {ar.stats.tokens_per_second:.1f} tokens/s -> speed-up "
              f"{ar.stats.seconds / s.seconds:.2f}x ({same})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    from .bench import add_parser as add_bench
    from .humaneval import add_parser as add_humaneval

    add_bench(sub)
    add_humaneval(sub)
    from .convert import add_parser as add_convert  # convert, fetch-smollm2

    add_convert(sub)
    from .tune import add_parser as add_tune

    add_tune(sub)
    from .options import add_compile_cache

    add_compile_cache(sub)
    args = parser.parse_args(argv)
    try:
        from pass_jax.compile_cache import enable

        enable(args.compile_cache)
        return args.func(args) if hasattr(args, "func") else run_generate(args)
    except (ConfigError, CacheOverflowError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
