"""`dinolike export CKPT --format official|hf|timm --out DIR`: parse, then `dinolike.jobs.export.export`
(formats and outputs are described there)."""

from __future__ import annotations

import argparse
import json
import sys

from dinolike.jobs.export import FORMATS, export
from dinolike.models.load import CheckpointMismatchError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinolike export", description="Export a checkpoint: official | hf | timm.")
    p.add_argument("ckpt", help="training checkpoint, exported/official backbone, or HF / timm directory")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="official: DINOv2 .pth; hf: transformers folder; timm: timm local-dir folder")
    p.add_argument("--out", required=True, help="output directory (created; our files in it are replaced)")
    p.add_argument("--allow-collapsed", action="store_true",
                   help="export a backbone that gives every input the same embedding (refused by default); "
                        "its model card then says so")
    p.add_argument(
        "--which",
        default="teacher",
        choices=("teacher", "student"),
        help="model of a training checkpoint to export (default: the EMA teacher)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export(args.ckpt, args.format, args.out, args.which, args.allow_collapsed)
    except (CheckpointMismatchError, FileNotFoundError, ValueError, OSError) as e:
        print(f"dinolike export: error: {e}", file=sys.stderr)
        return 2
    files = ", ".join(sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")))
    print(json.dumps({"format": args.format, "out": str(out), "files": files}))
    return 0

