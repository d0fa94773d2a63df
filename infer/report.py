"""Render benchmark JSON (from `python -m infer bench --out`) as Markdown tables for the README."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def table(result: dict) -> str:
    rows = result["rows"]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    command = result.get("command") or "python -m infer bench --suite " + result["suite"]
    lines = [f"`{command}` ({result['dtype']}, {result['machine']['cpu_count']} CPU cores)", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(paths: list[str]) -> int:
    for p in paths:
        print(table(json.loads(Path(p).read_text())) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
