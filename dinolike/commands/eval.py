"""`dinolike eval knn|linear|logreg ...` (also `python -m eval ...` from a checkout): one entry for every eval command."""

from __future__ import annotations

import difflib
import importlib
import sys

PROTOCOLS = {
    "knn": "weighted kNN on frozen features",
    "linear": "linear probe on frozen features (grid of learning rates)",
    "logreg": "logistic regression on frozen features (sweep of C)",
}
# `python -m eval plot|viz` still runs them, but they are not protocols: help lists them as the commands
# they are, `dinolike plot` and `dinolike viz`
COMMANDS = (*PROTOCOLS, "plot", "viz")
MODULES = {"knn": "dinolike.eval.protocols", "linear": "dinolike.eval.linear", "logreg": "dinolike.eval.logreg",
           "plot": "dinolike.eval.plot", "viz": "dinolike.eval.viz"}


def usage() -> str:
    lines = "\n".join(f"  {c:<7} {h}" for c, h in PROTOCOLS.items())
    return (f"usage: dinolike eval {{{'|'.join(PROTOCOLS)}}} [ARGS]   (dinolike eval knn --help for its options)"
            f"\n\nprotocols:\n{lines}\n\ntraining curves and PCA pictures: dinolike plot, dinolike viz")


def validate(argv: list[str]) -> None:
    """Check `COMMAND ARGS` without loading a model or any data (what `dinolike submit eval` runs before
    submitting; the protocols run the same checks first themselves). Raises ConfigError."""
    from dinolike.config import ConfigError

    if not argv or argv[0] not in COMMANDS:
        raise ConfigError(f"the eval command must be one of {', '.join(COMMANDS)}, got {' '.join(argv[:1]) or 'none'}")
    args = importlib.import_module(MODULES[argv[0]]).build_parser().parse_intermixed_args(argv[1:])
    if argv[0] in PROTOCOLS:
        from dinolike.eval.common import EvalError, check_args

        try:
            check_args(args)
        except EvalError as e:
            raise ConfigError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], PROTOCOLS, n=1) if argv else []
        what = f"unknown protocol {argv[0]!r}" if argv else "give a protocol"
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"{usage()}\n\ndinolike eval: error: {what}{hint}", file=sys.stderr)
        return 2
    module = importlib.import_module(MODULES[argv[0]])
    return int(module.main(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
