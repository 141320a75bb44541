"""`dinolike eval knn|linear|logreg ...` (also `python -m eval ...`): one entry for every eval command."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "knn": "weighted kNN on frozen features",
    "linear": "linear probe on frozen features (grid of learning rates)",
    "logreg": "logistic regression on frozen features (sweep of C)",
    "plot": "training curves of a run directory (= dinolike plot)",
    "viz": "PCA picture of patch features (= dinolike viz)",
}


def usage() -> str:
    lines = "\n".join(f"  {c:<7} {h}" for c, h in COMMANDS.items())
    return (f"usage: dinolike eval {{{'|'.join(COMMANDS)}}} [ARGS]   (dinolike eval knn --help for its options)"
            f"\n\nprotocols:\n{lines}")
PROTOCOLS = ("knn", "linear", "logreg")


def validate(argv: list[str]) -> None:
    """Check `COMMAND ARGS` without loading a model or any data (what `dinolike submit eval` runs before
    submitting; the protocols run the same checks first themselves). Raises ConfigError."""
    from dinolike.config import ConfigError

    if not argv or argv[0] not in COMMANDS:
        raise ConfigError(f"the eval command must be one of {', '.join(COMMANDS)}, got {' '.join(argv[:1]) or 'none'}")
    args = importlib.import_module(f".{argv[0]}", __package__).build_parser().parse_intermixed_args(argv[1:])
    if argv[0] in PROTOCOLS:
        from .common import EvalError, check_args

        try:
            check_args(args)
        except EvalError as e:
            raise ConfigError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"{usage()}\n\ndinolike eval: error: unknown protocol {argv[0]!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(f".{argv[0]}", __package__)  # eval.X, or dinolike_eval.X installed
    return int(module.main(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
