"""`python -m eval knn|linear|logreg|plot|viz ...`: one entry for every eval command."""

from __future__ import annotations

import importlib
import sys

COMMANDS = ("knn", "linear", "logreg", "plot", "viz")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m eval {{{'|'.join(COMMANDS)}}} [args...]", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module = importlib.import_module(f".{argv[0]}", __package__)  # eval.X, or dinolike_eval.X installed
    return int(module.main(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
