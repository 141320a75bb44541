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

# name -> module holding it, imported on first use (each pulls in torch or omegaconf)
_LAZY = {"embed": "dinolike.commands.api", "load": "dinolike.commands.api", "train": "dinolike.commands.api",
         "TrainError": "dinolike.commands.api", "ConfigError": "dinolike.config",
         "DataError": "dinolike.data.datasets", "CheckpointMismatchError": "dinolike.models.load",
         **dict.fromkeys(("DinolikeError", "NotFoundError", "CollapsedBackboneError"), "dinolike.errors")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dinolike' has no attribute {name!r}")
