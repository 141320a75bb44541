"""`dinolike viz --pretrained CKPT IMAGES...`: the PCA picture of patch features (dinolike/eval/viz.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from dinolike.eval.config import EvalError, resolve_config
from dinolike.eval.viz import viz_job


def build_parser(parser: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser(prog="dinolike viz", description="PCA picture of patch features (DINOv2 Fig. 1).")
    p.add_argument("--pretrained", required=True, help="checkpoint, or 'random' (with --config)")
    p.add_argument("--config", default=None, help="run config YAML or arch preset")
    p.add_argument("--which", default="teacher", choices=["teacher", "student"],
                   help="model of a training checkpoint (default: the EMA teacher)")
    p.add_argument("--resolution", type=int, default=None,
                   help="input size, rounded up to the patch size (default: the size the model was trained at)")
    p.add_argument("--tile", type=int, default=224, help="pixels per tile in the output grid")
    p.add_argument("--threshold", type=float, default=0.0, help="foreground threshold on scaled PC1 in [-1,1]")
    p.add_argument("--out", default="pca.png", help="output PNG")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_OVERRIDE",
                   help="image files, and section.key=value overrides as in every other command")
    p.add_argument("--opts", nargs="*", default=[], help="deprecated: pass the overrides as bare key=value")
    return p


def split_overrides(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """(images, overrides): a `key=value` that is not an existing file is an override."""
    images = [a for a in items if "=" not in a or Path(a).exists()]
    return images, [a for a in items if a not in images]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    images, overrides = split_overrides(args.images)
    if args.opts:
        print("dinolike viz: --opts is deprecated: pass the overrides as bare key=value", file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg, _ = resolve_config(args.pretrained, args.config, [*overrides, *args.opts])
        cfg.eval.which = args.which
        fig, n_read, res = viz_job(cfg, images, resolution=args.resolution, tile=args.tile,
                                   threshold=args.threshold, device=args.device)
    except (EvalError, FileNotFoundError) as e:
        print(f"dinolike viz: error: {e}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.save(args.out)
    print(f"{args.out} ({n_read} images at {res} px, {len(images) - n_read} skipped)")
    return 0
