"""Result files of the eval jobs: results.json (everything) and results.md (the table), written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def probe_headline(result: Mapping[str, Any]) -> dict[str, float]:
    """A probe's headline numbers, averaged over few-label splits."""
    return {"test_top1": result["test_top1"], "test_top5": result["test_top5"]}


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows of equal keys -> a GitHub markdown table (floats with 2 decimals)."""
    if not rows:
        return ""
    cols = list(rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: str | Path, payload: Mapping[str, Any], title: str, rows: Sequence[Mapping]) -> str:
    """Write results.json and results.md into out_dir; returns the markdown text."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = f"### {title}\n\n{markdown_table(rows)}\n"
    for name, text in (("results.md", md), ("results.json", json.dumps(payload, indent=2, default=str) + "\n")):
        tmp = out / f".{name}.{os.getpid()}.tmp"  # per process: two ranks never share a temp file
        tmp.write_text(text)
        os.replace(tmp, out / name)  # results.json last: its presence means both are complete
    return md
