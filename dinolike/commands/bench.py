"""`dinolike bench --config FILE [key=value ...]`: parse, load the recipe, time its step
(`dinolike.bench.command.run_bench`) and print the result."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from dinolike.bench.command import MARKDOWN_HEADER, markdown_row, run_bench
from dinolike.bench.device import SDPA_CHOICES
from dinolike.config import ConfigError, load_config
from dinolike.training.validate import check_train_config


def build_parser(parser: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser(prog="dinolike bench", description="Time the real training step: img/s, breakdown, MFU.")
    p.add_argument("--config", required=True, help="recipe yaml whose step is timed")
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (allocator, kernels)")
    p.add_argument("--synthetic", action="store_true",
                   help="random crops and masks made on the device once, no data pipeline")
    p.add_argument("--sdpa", choices=SDPA_CHOICES, default="auto",
                   help="SDPA kernel: torch's choice (auto) or only this one (an error where it cannot run)")
    p.add_argument("--markdown", action="store_true", help="also print a BENCHMARKS.md table row")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may follow options (scripts append)
    if args.iters < 1 or args.warmup < 0:
        print("dinolike bench: error: --iters must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, ["run.progress=false", *args.overrides])
        check_train_config(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"dinolike bench: error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        res = run_bench(cfg, args.iters, args.warmup, synthetic=args.synthetic, sdpa=args.sdpa)
    except torch.OutOfMemoryError:  # the ViT-g batch ladder's expected end: one line, exit 1
        print(f"dinolike bench: error: out of memory at batch {cfg.data.batch_size} per process", file=sys.stderr)
        return 1
    except RuntimeError as e:  # e.g. --sdpa flash where no flash kernel can run these inputs
        print(f"dinolike bench: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
    res["threads"] = torch.get_num_threads()
    text = json.dumps(res, indent=2)
    print(text)
    if args.markdown:
        print(MARKDOWN_HEADER)
        print(markdown_row(args.config, res))
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0

