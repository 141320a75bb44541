"""Interoperability: official DINOv2 files in, official / Hugging Face / timm formats out.

`official` reads every official layout strictly (and the training `teacher_checkpoint.pth` with its heads)
and `load_pretrained` builds a model from any of them; `hf` and `timm` are pure state-dict + config
mappings both ways (`dinolike export` is the command on top, in `dinolike/commands/export.py`).
Neither transformers nor timm is imported here: they are only needed to use what we write.
"""

from dinolike.interop.official import load_pretrained

__all__ = ["load_pretrained"]
