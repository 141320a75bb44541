"""`dinolike plot RUN_DIR`: PNG of the training curves of a run (dinolike/eval/plot.py draws it)."""

from __future__ import annotations

import argparse
import sys

from dinolike.eval.plot import plot_curves


def build_parser(parser: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser(prog="dinolike plot", description="Plot training curves of a run directory.")
    p.add_argument("run_dir", help="run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, help="output PNG (default: RUN_DIR/curves.png)")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (pixels per inch)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = plot_curves(args.run_dir, args.out, args.dpi)
    except (FileNotFoundError, ValueError) as e:
        print(f"dinolike plot: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
