"""`dinolike embed CKPT_OR_RUN --data folder:DIR --out FILE [--patches]`: parse, then the embed job
(`dinolike.jobs.embed.embed_to_file`, whose docstring lists the output formats)."""

from __future__ import annotations

import argparse
import sys

from dinolike.errors import DinolikeError
from dinolike.jobs.embed import SUFFIXES, embed_to_file
from dinolike.jobs.embed import __doc__ as _JOB_DOC

EPILOG = _JOB_DOC.split("\n\n", 2)[2]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinolike embed",
                                description="CLS (+ pooled patch) embeddings of a set of images -> .npy / .parquet.",
                                epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pretrained",
                   help="run folder, training checkpoint, exported or official backbone, HF / timm folder")
    p.add_argument("--data", required=True, help="images: folder:DIR, folder-nolabels:DIR, manifest:FILE, "
                   "fmnist:train|test, or a folder / list file")
    p.add_argument("--out", required=True, help=f"output file: {' or '.join(SUFFIXES)}")
    p.add_argument("--patches", action="store_true", help="also write the mean of the patch tokens")
    p.add_argument("--which", default="teacher", choices=("teacher", "student"), help="model of a checkpoint")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--num-workers", type=int, default=0, help="image-decoding processes (0: in this one)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--allow-collapsed", action="store_true",
                   help="embed with a backbone that gives every image the same embedding (refused by default)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        emb, files = embed_to_file(args.pretrained, args.data, args.out, patches=args.patches, which=args.which,
                                   batch_size=args.batch_size, num_workers=args.num_workers,
                                   device=args.device, progress=not args.no_progress,
                                   allow_collapsed=args.allow_collapsed)
    except (DinolikeError, FileNotFoundError) as e:  # EmbedError, DataError, CollapsedBackboneError, ...
        print(f"dinolike embed: error: {e}", file=sys.stderr)
        return 2
    skipped = f"; {len(emb.skipped)} unreadable skipped (e.g. {emb.skipped[0]})" if emb.skipped else ""
    print(f"dinolike embed: {len(emb)} images x {emb.cls.shape[1]} dims written to "
          f"{', '.join(map(str, files))}{skipped}", file=sys.stderr)
    return 0

