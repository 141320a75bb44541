"""dinolike: DINOv2-style self-supervised ViT pretraining.

The Python API, `dinolike.train(out_dir, data=..., recipe=..., **overrides)`, `dinolike.load(ckpt_or_run)`
and `dinolike.embed(model_or_path, data)`, lives with the commands it calls (`dinolike/commands/api.py`)
and is imported on first use: `import dinolike` stays cheap, and the library below never loads a command.
The training library itself is `dinolike.training` (loop, step, methods, checkpoints).
"""

from __future__ import annotations

from typing import Any

__all__ = ["embed", "load", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dinolike.commands import api

        return getattr(api, name)
    raise AttributeError(f"module 'dinolike' has no attribute {name!r}")
