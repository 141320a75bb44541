"""Checks of a merged training config's values, before any work: before the model is built, before a
SLURM job is submitted. The schema already rejects unknown keys and wrong types; this rejects values the
code would only trip over later (a misspelt choice, a zero batch), or worse, accept silently
(`dist.mixed_precision: fp16` would quietly train in fp32). Nothing here reads the disk: a job may be
submitted from a machine that does not see the cluster's files.
"""

from __future__ import annotations

from omegaconf import DictConfig

from dinolike.config import ConfigError, check_values
from dinolike.data.datasets import parse_spec
from dinolike.models.vit import PRESETS

CHOICES: dict[str, tuple[object, ...]] = {
    "run.device": ("auto", "cpu", "cuda"),
    "run.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "model.arch": (*PRESETS, "custom", None),
    "model.ffn_layer": (None, "mlp", "swiglu"),
    "loss.centering": ("sinkhorn_knopp", "softmax"),
    "optim.lr_scaling": ("sqrt", "linear", "none"),
    "optim.lr_schedule": ("cosine", "constant"),
    "dist.strategy": ("auto", "none", "ddp", "fsdp"),  # none: one process, no gradient sync
    "dist.mixed_precision": ("bf16", "fp32"),
    "dist.activation_checkpointing_scope": ("block", "attn", "mlp"),
    "data.channels": (1, 3),
}
MINIMUM: dict[str, float] = {
    **dict.fromkeys(("run.log_every", "run.checkpoint_every", "data.batch_size", "data.skip_window", "data.limit",
                     "optim.epoch_length", "dist.local_processes"), 1),
    **dict.fromkeys(("run.keep_last", "data.num_workers", "optim.warmup_epochs", "optim.clip_grad",
                     "optim.lr_cooldown_epochs"), 0),
}
FRACTIONS = ("data.max_skipped_fraction", "masking.probability")


def check_train_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad value."""
    check_values(cfg, CHOICES, MINIMUM, FRACTIONS)
    if cfg.optim.epochs <= 0:
        raise ConfigError(f"optim.epochs must be > 0, got {cfg.optim.epochs}")
    if cfg.dist.cpu_bf16 and cfg.run.device == "cuda":  # it would be ignored: a GPU run reads mixed_precision
        raise ConfigError("dist.cpu_bf16 applies to CPU runs only; on CUDA set dist.mixed_precision: bf16")
    specs = {"data.train": cfg.data.train}
    if cfg.eval.knn_every and cfg.eval.knn_train is not None:  # without a bank: no periodic kNN
        specs.update({"eval.knn_train": cfg.eval.knn_train, "eval.knn_val": cfg.eval.knn_val})
    if cfg.eval.final_knn:
        specs.update({"eval.final_train": cfg.eval.final_train, "eval.final_val": cfg.eval.final_val})
    for key, spec in specs.items():
        try:
            parse_spec(spec)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
