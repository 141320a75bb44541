"""`dinolike COMMAND ...`: one entry point; each command lives in its own module.

This is the top of the house (the CLI floor, with the command shells of `dinolike/commands`): it may name
any command; the library below never imports it.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import sys

# command -> ("module" with main(argv) -> int, or "module:function", one-line help); argv is what follows
# the command's name
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("dinolike.commands.train:train_command", "pretrain (or run a high-res phase) from a config"),
    "distill": ("dinolike.commands.train:distill_command", "distill a pretrained teacher into smaller students"),
    "eval": ("dinolike.commands.eval", "knn | linear | logreg evaluation of a checkpoint"),
    "plot": ("dinolike.commands.plot", "PNG of the training curves of a run directory"),
    "viz": ("dinolike.commands.viz", "PCA picture of patch features"),
    "export": ("dinolike.commands.export", "export a checkpoint: official | hf | timm"),
    "shard": ("dinolike.commands.shard", "images -> WebDataset tar shards + index (data.train=shards:DIR)"),
    "embed": ("dinolike.commands.embed", "CLS (+ pooled patch) embeddings of a folder of images -> .npy / .parquet"),
    "bench": ("dinolike.commands.bench", "time the training step: img/s, breakdown, MFU"),
    "submit": ("dinolike.commands.submit", "submit a job to SLURM through submitit"),
    "curate": ("dinolike.commands.curate", "curation steps: embed | dedup | retrieve | sample | build"),
    "pipeline": ("dinolike.commands.pipeline", "the whole flow: curate -> pretrain -> highres -> distill -> eval"),
}


def version() -> str:
    """The installed distribution's version; the source tree's pyproject when run uninstalled."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("dinolike")
    except PackageNotFoundError:
        return "unknown"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = "\n".join(f"  {c:<{width}}  {h}" for c, (_, h) in COMMANDS.items())
    return (f"usage: dinolike COMMAND [ARGS]   (dinolike COMMAND --help for its options)\n\n"
            f"commands:\n{lines}\n\noptions:\n  -h, --help  this list\n  --version   print the version")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(f"dinolike {version()}")
        return 0
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    if not argv:  # a command is required: the list, on stderr, and a status a script can test
        print(f"{usage()}\n\ndinolike: error: give a command", file=sys.stderr)
        return 2
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f" (choose from {', '.join(COMMANDS)})"
        print(f"{usage()}\n\ndinolike: error: unknown command {argv[0]!r}{hint}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader's INFO lines drown --help
    module, _, function = COMMANDS[argv[0]][0].partition(":")
    try:
        return getattr(importlib.import_module(module), function or "main")(argv[1:])
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """A command that joined a torch.distributed group (torchrun, SLURM tasks: train, curate's sharded steps)
    leaves it before the interpreter exits: gloo's threads otherwise abort a finished job ("terminate called
    without an active exception", exit -6). Commands that never imported torch.distributed skip this."""
    if "torch.distributed" in sys.modules:
        from dinolike import dist

        dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())
