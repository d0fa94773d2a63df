"""python -m train lookahead|pretrain|eval-lookahead|sweep|bench-step — see `--help` of each."""

from __future__ import annotations

import argparse
import sys

from pass_jax.cache import CacheOverflowError
from pass_jax.config import ConfigError


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import eval_lookahead, lookahead, pretrain, step_bench, sweep
    from .common import apply_yaml_defaults

    lookahead.add_parser(sub)
    pretrain.add_parser(sub)
    eval_lookahead.add_parser(sub)
    sweep.add_parser(sub)
    step_bench.add_parser(sub)
    try:
        if argv and argv[0] in sub.choices:
            apply_yaml_defaults(sub.choices[argv[0]], argv[1:])
        args = parser.parse_args(argv)
        return args.func(args)
    except (ConfigError, CacheOverflowError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
