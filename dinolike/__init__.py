"""dinolike: DINOv2-style self-supervised ViT pretraining.

The Python API, `dinolike.train(out_dir, data=..., recipe=..., **overrides)`, `dinolike.load(ckpt_or_run)`
and `dinolike.embed(model_or_path, data)`, lives with the commands it calls (`dinolike/commands/api.py`)
and is imported on first use: `import dinolike` stays cheap, and the library below never loads a command.

`dinolike.train` is also the name of the training package (`dinolike/train/`), which Python sets as this
package's attribute once anything imports it. So that attribute is the package made callable: calling it
is the API's `train`, importing from it (`dinolike.train.loop`) is the package, whichever came first.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = ["embed", "load", "train"]


class _CallablePackage(types.ModuleType):
    """The `dinolike.train` package, callable as `dinolike.commands.api.train`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from dinolike.commands.api import train

        return train(*args, **kwargs)


class _Facade(types.ModuleType):
    """This package: the `train` sub-package becomes callable the moment the import system attaches it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and type(value) is types.ModuleType:
            value.__class__ = _CallablePackage
        super().__setattr__(name, value)


def __getattr__(name: str) -> Any:
    if name == "train":  # the package (callable), imported now: the same object as after `import dinolike.train`
        return importlib.import_module("dinolike.train")
    if name in __all__:
        from dinolike.commands import api

        return getattr(api, name)
    raise AttributeError(f"module 'dinolike' has no attribute {name!r}")


sys.modules[__name__].__class__ = _Facade  # a module may change its class (ModuleType subclasses only)
