"""`dinolike COMMAND ...`: one entry point; each command lives in its own module.

This is the top of the house (the CLI floor, with `dinolike/commands` and the command packages): it may
name any command; the library below never imports it. The command packages `eval`, `curation` and
`launch` are reached through `import_command` (installed as `dinolike_eval`, ...; see
`dinolike/commands/packages.py`), so another distribution's `eval` or `launch` cannot take their place.
"""

from __future__ import annotations

import importlib
import logging
import sys

from dinolike.commands.packages import COMMAND_PACKAGES, import_command

# command -> (module with main(argv) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("dinolike.commands.train", "pretrain (or run a high-res phase) from a config"),
    "distill": ("dinolike.commands.train", "distill a pretrained teacher into smaller students"),
    "eval": ("eval.__main__", "knn | linear | logreg evaluation of a checkpoint"),
    "plot": ("eval.plot", "PNG of the training curves of a run directory"),
    "viz": ("eval.viz", "PCA picture of patch features"),
    "export": ("dinolike.commands.export", "export a checkpoint: official | hf | timm"),
    "bench": ("dinolike.bench", "time the training step: img/s, breakdown, MFU"),
    "submit": ("launch.__main__", "submit a job to SLURM through submitit"),
    "curate": ("curation.__main__", "curation steps: embed | dedup | retrieve | sample | build"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = "\n".join(f"  {c:<{width}}  {h}" for c, (_, h) in COMMANDS.items())
        print(f"usage: dinolike COMMAND [ARGS]\n\ncommands:\n{lines}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    name = COMMANDS[argv[0]][0]
    module = import_command(name) if name.partition(".")[0] in COMMAND_PACKAGES else importlib.import_module(name)
    if argv[0] in ("train", "distill"):
        return module.main(argv)
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
