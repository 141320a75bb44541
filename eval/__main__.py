"""`python -m eval knn|linear|logreg|plot|viz ...`: one entry for every eval command."""

from __future__ import annotations

import importlib
import sys

COMMANDS = ("knn", "linear", "logreg", "plot", "viz")
PROTOCOLS = ("knn", "linear", "logreg")


def validate(argv: list[str]) -> None:
    """Check `COMMAND ARGS` without loading a model or any data (what `dinolike submit eval` runs before
    submitting; the protocols run the same checks first themselves). Raises ConfigError."""
    from dinolike.config import ConfigError

    if not argv or argv[0] not in COMMANDS:
        raise ConfigError(f"the eval command must be one of {', '.join(COMMANDS)}, got {' '.join(argv[:1]) or 'none'}")
    args = importlib.import_module(f"eval.{argv[0]}").build_parser().parse_intermixed_args(argv[1:])
    if argv[0] in PROTOCOLS:
        from eval.common import EvalError, check_args

        try:
            check_args(args)
        except EvalError as e:
            raise ConfigError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m eval {{{'|'.join(COMMANDS)}}} [args...]", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module = importlib.import_module(f"eval.{argv[0]}")
    return int(module.main(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
