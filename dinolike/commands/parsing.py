"""A command-line parser that raises instead of exiting: for checking a command's arguments in-process
(`dinolike submit` checks the job's own arguments before submitting; a pipeline checks its eval lines)."""

from __future__ import annotations

import argparse

from dinolike.config import ConfigError


class RaisingParser(argparse.ArgumentParser):
    """Errors are ConfigErrors; no --help (a checked line never prints help and exits)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["add_help"] = False
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)
