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


def methods_table(result: dict) -> str:
    """One row per (batch, sampling, method), one column group per dtype: tokens/forward, tokens/s,
    speed-up over the fastest autoregressive run of the same setting, rows identical to AR."""
    rows = result["rows"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    head = ["batch", "sampling", "method"] + [f"{d} {c}" for d in dtypes
                                             for c in ("tok/fwd", "tok/s", "speed-up", "= AR")]
    lines = [f"`{result.get('command')}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in dict.fromkeys((r["batch"], r["sampling"], r["method"]) for r in rows):
        cells = list(map(str, key))
        for d in dtypes:
            r = next((r for r in rows if (r["batch"], r["sampling"], r["method"], r["dtype"]) == (*key, d)), None)
            cells += ["", "", "", ""] if r is None else [
                f"{r['tokens_per_forward']:.2f}", f"{r['tokens_per_second']:.1f}",
                f"**{r['speedup_vs_fastest_ar']:.2f}**" if r["speedup_vs_fastest_ar"] > 1 else
                f"{r['speedup_vs_fastest_ar']:.2f}", r["rows_identical_to_ar"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(paths: list[str]) -> int:
    for p in paths:
        result = json.loads(Path(p).read_text())
        print((methods_table(result) if result.get("suite") == "methods" else table(result)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
