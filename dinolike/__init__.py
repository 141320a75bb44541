"""dinolike: DINOv2-style self-supervised ViT pretraining.

The Python API, `dinolike.train(out_dir, data=..., recipe=..., **overrides)`, `dinolike.load(ckpt_or_run)`
and `dinolike.embed(model_or_path, data)`, lives with the commands it calls (`dinolike/commands/api.py`)
and is imported on first use: `import dinolike` stays cheap, and the library below never loads a command.
Every error the API raises on purpose is a `dinolike.DinolikeError` (its subclasses are listed in
`__all__` and in the README). The training library itself is `dinolike.training` (loop, step, methods,
checkpoints).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CheckpointMismatchError", "CollapsedBackboneError", "ConfigError", "DataError", "DinolikeError",
           "NotFoundError", "TrainError", "embed", "load", "train"]


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use (each module pulls in torch or omegaconf)."""
    if name in ("embed", "load", "train", "TrainError"):
        from dinolike.commands import api as module
    elif name == "ConfigError":
        from dinolike import config as module
    elif name == "DataError":
        from dinolike.data import datasets as module
    elif name == "CheckpointMismatchError":
        from dinolike.models import load as module
    elif name in ("DinolikeError", "NotFoundError", "CollapsedBackboneError"):
        from dinolike import errors as module
    else:
        raise AttributeError(f"module 'dinolike' has no attribute {name!r}")
    return getattr(module, name)
