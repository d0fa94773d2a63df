"""What both training commands share: YAML defaults, resume checks, the text corpus reader."""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path


def run_command(commands, argv: list[str], description: str | None = None) -> int:
    """Parse `python -m train` argv against the given command modules (each has `add_parser(sub)`),
    apply a --config YAML's defaults, and run the command: the CLI passes all of them, `train sweep`
    only `lookahead` (so no command module needs to import the CLI)."""
    parser = argparse.ArgumentParser(prog="python -m train", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in commands:
        command.add_parser(sub)
    from infer.options import add_compile_cache
    from pass_jax.compile_cache import enable

    add_compile_cache(sub)
    if argv and argv[0] in sub.choices:
        apply_yaml_defaults(sub.choices[argv[0]], argv[1:])
    args = parser.parse_args(argv)
    enable(args.compile_cache)
    return args.func(args)


def apply_yaml_defaults(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Let --config FILE set defaults; explicit flags still win. Keys and values are checked like flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return
    import yaml

    values = yaml.safe_load(Path(known.config).read_text()) or {}
    actions = {a.dest: a for a in parser._actions}
    clean = {}
    for key, value in values.items():
        dest = key.replace("-", "_")
        action = actions.get(dest)
        if action is None or dest == "config":
            raise ValueError(f"{known.config}: unknown setting {key!r}")
        if action.nargs == "+" and not isinstance(value, list):
            value = [value]
        if action.type is not None and value is not None:
            value = [action.type(v) for v in value] if isinstance(value, list) else action.type(value)
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"{known.config}: {key} must be one of {', '.join(map(str, action.choices))}, "
                             f"got {value!r}")
        clean[dest] = value
    parser.set_defaults(**clean)


def check_resume(out: Path, args, keys) -> None:
    """Record the settings that shape the result; a resume with different ones would not be exact."""
    path = out / "run_args.json"
    mine = {k: getattr(args, k) for k in keys}
    if path.is_file():
        theirs = json.loads(path.read_text())
        changed = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if changed:
            raise ValueError("--resume with settings that differ from the run being resumed: " +
                             ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    else:
        path.write_text(json.dumps(mine, indent=2))


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def corpus_files(paths: list[str] | None) -> list[Path]:
    if not paths:
        root = Path(stdlib_dir())
        return sorted(f for f in root.rglob("*.py")
                      if not ({"test", "tests", "site-packages", "idle_test"} & set(f.relative_to(root).parts)))
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise FileNotFoundError(f"corpus path {raw!r} does not exist")
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return files


def read_corpus(paths, max_mb: float) -> list[str]:
    docs, total = [], 0
    for f in corpus_files(paths):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(text)
            total += len(text)
            if total > max_mb * 1e6:
                break
    if not docs:
        raise ValueError("the corpus holds no readable text")
    return docs
