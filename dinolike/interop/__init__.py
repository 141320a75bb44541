"""Interoperability: official DINOv2 files in, official / Hugging Face / timm formats out.

`official` reads every official layout strictly (and the training `teacher_checkpoint.pth` with its heads),
`hf` and `timm` are pure state-dict + config mappings both ways, `export_cli` is `dinolike export`.
Neither transformers nor timm is imported here: they are only needed to use what we write.
"""
