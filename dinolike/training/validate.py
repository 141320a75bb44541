"""Checks of a merged training config's values, before any work: before the model is built, before a
SLURM job is submitted. The schema already rejects unknown keys and wrong types; this rejects values the
code would only trip over later (a misspelt choice, a zero batch), or worse, accept silently
(`precision.cuda: fp16` would quietly train in fp32). Nothing here reads the disk: a job may be
submitted from a machine that does not see the cluster's files.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

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
    "precision.cuda": ("bf16", "fp32"),
    "precision.cpu": ("fp32", "bf16", "auto"),
    "dist.activation_checkpointing_scope": ("block", "attn", "mlp"),
    "data.channels": (1, 3),
}
MINIMUM: dict[str, float] = {
    **dict.fromkeys(("run.log_every", "run.checkpoint_every", "data.batch_size", "data.skip_window", "data.limit",
                     "data.shard_window", "optim.epoch_length", "dist.local_processes"), 1),
    **dict.fromkeys(("run.keep_last", "data.num_workers", "optim.warmup_epochs", "optim.clip_grad",
                     "optim.lr_cooldown_epochs"), 0),
}
FRACTIONS = ("data.max_skipped_fraction", "masking.probability")
# (low, high, low_included, high_included): a negative lr, a momentum above 1 or a weight decay of 5 used
# to train on (loss 11 -> 61) instead of failing; the bounds are loose, only nonsense is refused
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "optim.base_lr": (0.0, 1.0, False, True),
    "optim.min_lr": (0.0, 1.0, True, True),
    "optim.weight_decay": (0.0, 1.0, True, True),
    "optim.weight_decay_end": (0.0, 1.0, True, True),
    "optim.layerwise_decay": (0.0, 1.0, False, True),
    "optim.patch_embed_lr_mult": (0.0, 10.0, True, True),
    "optim.freeze_last_layer_epochs": (0.0, float("inf"), True, True),
    "teacher.momentum": (0.0, 1.0, True, True),
    "teacher.final_momentum": (0.0, 1.0, True, True),
    "teacher.temp": (0.0, float("inf"), False, True),
    "teacher.warmup_temp": (0.0, float("inf"), False, True),
    "teacher.warmup_temp_epochs": (0.0, float("inf"), True, True),
    "loss.student_temp": (0.0, float("inf"), False, True),
    "loss.dino_weight": (0.0, float("inf"), True, True),
    "loss.ibot_weight": (0.0, float("inf"), True, True),
    "loss.koleo_weight": (0.0, float("inf"), True, True),
    "loss.center_momentum": (0.0, 1.0, True, True),
    "model.drop_path_rate": (0.0, 1.0, True, False),
    "model.layerscale": (0.0, float("inf"), True, True),
}
# lists whose every element must lie in a range (same tuple), and whose two ends must be ordered
LIST_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "optim.betas": (0.0, 1.0, True, False),
    "crops.global_scale": (0.0, 1.0, False, True),
    "crops.local_scale": (0.0, 1.0, False, True),
    "masking.ratio": (0.0, 1.0, True, True),
}
ORDERED = ("crops.global_scale", "crops.local_scale", "masking.ratio", "crops.ratio")


def _interval(low: float, high: float, low_in: bool, high_in: bool) -> str:
    return f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def _inside(v: float, low: float, high: float, low_in: bool, high_in: bool) -> bool:
    return (v >= low if low_in else v > low) and (v <= high if high_in else v < high)


def check_ranges(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first value outside its range, or a min above its max."""
    for key, bounds in RANGES.items():
        v = OmegaConf.select(cfg, key)
        if v is not None and not _inside(v, *bounds):
            raise ConfigError(f"{key} must be in {_interval(*bounds)}, got {v}")
    for key, bounds in LIST_RANGES.items():
        values = list(OmegaConf.select(cfg, key))
        if not all(_inside(v, *bounds) for v in values):
            raise ConfigError(f"{key} values must be in {_interval(*bounds)}, got {values}")
    for key in ORDERED:
        v = list(OmegaConf.select(cfg, key))
        if len(v) != 2 or v[0] > v[1]:
            raise ConfigError(f"{key} must be [low, high] with low <= high, got {v}")
    if cfg.optim.min_lr > cfg.optim.base_lr:
        raise ConfigError(f"optim.min_lr ({cfg.optim.min_lr}) must not exceed optim.base_lr ({cfg.optim.base_lr})")
    if cfg.teacher.momentum > cfg.teacher.final_momentum:
        raise ConfigError(f"teacher.momentum ({cfg.teacher.momentum}) must not exceed teacher.final_momentum "
                          f"({cfg.teacher.final_momentum}): the teacher slows down over a run, never speeds up")


def check_train_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad value."""
    check_values(cfg, CHOICES, MINIMUM, FRACTIONS)
    check_ranges(cfg)
    if cfg.precision.cpu == "bf16" and cfg.run.device == "cuda":  # it would be ignored: a GPU run reads .cuda
        raise ConfigError("precision.cpu applies to CPU runs only; on CUDA set precision.cuda: bf16")
    if cfg.optim.epochs <= 0:
        raise ConfigError(f"optim.epochs must be > 0, got {cfg.optim.epochs}")
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
