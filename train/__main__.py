"""python -m train lookahead|pretrain|eval-lookahead|sweep|bench-step — see `--help` of each."""

from __future__ import annotations

import sys

from pass_jax.errors import CacheOverflowError, ConfigError


def main(argv=None) -> int:
    from . import eval_lookahead, lookahead, pretrain, step_bench, sweep
    from .common import run_command

    try:
        return run_command((lookahead, pretrain, eval_lookahead, sweep, step_bench),
                           sys.argv[1:] if argv is None else argv, __doc__)
    except (ConfigError, CacheOverflowError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
