"""The one family of errors dinolike raises on purpose: `except dinolike.DinolikeError` catches them all.

Each keeps the builtin base it had before (ValueError, RuntimeError, FileNotFoundError), so code that
caught those still does. Leaf module: any layer may import it, it imports nothing of dinolike.
"""

from __future__ import annotations


class DinolikeError(Exception):
    """Base of every error dinolike raises on purpose: bad input it can name, or a run that failed. The
    message is the one line the command would print."""


class NotFoundError(DinolikeError, FileNotFoundError):
    """A checkpoint, run folder, recipe or data path that does not exist."""


class CollapsedBackboneError(DinolikeError, ValueError):
    """The backbone gives every input the same embedding: exporting or embedding with it would ship a
    useless model (pass allow_collapsed / --allow-collapsed to go on anyway)."""
