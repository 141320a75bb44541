"""`dinolike shard SOURCE --out DIR`: images -> WebDataset tar shards + index.json, for `data.train=shards:DIR`.

SOURCE: folder:DIR (labels from sub-folders), folder-nolabels:DIR, manifest:FILE, curation:WORK_DIR (the
kept set of `dinolike curate build`), or a plain folder / list file. Images are stored as they are.

At scale, write in parallel and join the parts (each part is its own process or SLURM task):
  dinolike shard SRC --out DIR --part 0 --parts 8   ...   dinolike shard SRC --out DIR --part 7 --parts 8
  dinolike shard --merge 8 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys

from dinolike.data.datasets import DataError
from dinolike.data.shard_writer import ShardConfig, merge_index, write_shards


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinolike shard", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help="folder:DIR | folder-nolabels:DIR | manifest:FILE | curation:WORK_DIR")
    p.add_argument("--out", required=True, help="output folder (shard-NNNNNN.tar, .idx.npy, index.json)")
    p.add_argument("--shard-size", type=int, default=ShardConfig.shard_size, help="images per shard")
    p.add_argument("--no-check", action="store_true",
                   help="store files without decoding them first (unreadable ones are then skipped in training)")
    p.add_argument("--part", type=int, default=0, help="this writer's part (0-based), with --parts")
    p.add_argument("--parts", type=int, default=1, help="writers in all: each writes every N-th shard")
    p.add_argument("--merge", type=int, metavar="PARTS", help="join the indexes of PARTS finished parts")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.merge:
            summary = merge_index(args.out, args.merge)
        elif not args.source:
            print("dinolike shard: error: give a SOURCE (or --merge PARTS)", file=sys.stderr)
            return 2
        else:
            cfg = ShardConfig(source=args.source, out=args.out, shard_size=args.shard_size,
                              check=not args.no_check, part=args.part, parts=args.parts)
            summary = write_shards(cfg)
    except ModuleNotFoundError as e:
        print(f"dinolike shard: error: {e}; install it with `pip install 'dinolike[shards]'`", file=sys.stderr)
        return 2
    except (DataError, ValueError, OSError) as e:
        print(f"dinolike shard: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "classes"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
