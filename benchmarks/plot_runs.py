"""Overlay the collapse-watch curves of several runs: DINO global loss, teacher-target entropy, KoLeo.

    python benchmarks/plot_runs.py --out curves.png "warmup 0.1, seed 1=/tmp/a" "warmup 0.5, seed 1=/tmp/b"

Each argument is LABEL=RUN_DIR (its metrics.jsonl); ln K is drawn as a dashed line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("dino_global_loss", "DINO global loss"), ("teacher_entropy", "teacher-target entropy (nats)"),
          ("koleo_loss", "KoLeo"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--prototypes", type=int, default=256, help="K, for the ln K line")
    args = p.parse_args(argv)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for spec in args.runs:
        label, _, run = spec.rpartition("=")
        rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x.strip()]
        its = [r["iteration"] for r in rows]
        for ax, (key, _) in zip(axes, PANELS, strict=True):
            ax.plot(its, [r.get(key, math.nan) for r in rows], label=label or run)
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        if key != "koleo_loss":
            ax.axhline(math.log(args.prototypes), ls="--", c="gray", lw=1)
        ax.set_title(title)
        ax.set_xlabel("iteration")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
