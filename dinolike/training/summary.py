"""The run in words: a start summary (what, on what, how long) and one line per metrics row.

Written to the terminal and log.txt alike (RunLog.say), with or without a progress bar: a run with
`run.progress=false` used to show nothing until it ended, and its log.txt stayed empty.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from dinolike.training.estimate import human_duration
from dinolike.training.step import cpu_bf16

# past this long by the FLOP bound, say before the first step that the recipe is made for a GPU: a GPU recipe
# on a CPU needs days, the CPU main job ~1 h by the bound even on busy cores without AVX-512 (3 h once seen
# under a load of 7 on 2 cores), and its real time comes from its timed first iterations anyway
CPU_WARN_SECONDS = 12 * 3600


def millions(module: nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f} M"


def precision(cfg: DictConfig, device: torch.device) -> str:
    """The arithmetic a step runs in: the estimate holds for this case only (bf16 is ~2x fp32 on a CPU)."""
    if device.type == "cuda":
        return "bf16" if cfg.precision.cuda == "bf16" else "fp32"
    return "bf16 autocast (precision.cpu)" if cpu_bf16(cfg.precision) else "fp32"


def device_text(cfg: DictConfig, device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)}), {precision(cfg, device)}"
    return f"cpu, {torch.get_num_threads()} thread(s) per process, {precision(cfg, device)}"


def start_lines(cfg: DictConfig, *, out: str, how: str, images: int, world: int, device: torch.device,
                backbone: nn.Module, heads: nn.Module | None, start: int, total: int) -> list[str]:
    """The summary printed before the first step; its estimate follows once the first steps are timed."""
    m, o = cfg.model, cfg.optim
    per = cfg.data.batch_size
    layout = f"{world} processes x {per}" if world > 1 else "1 process"
    dev = device_text(cfg, device)
    head_text = f" (+{millions(heads)} in the heads)" if heads is not None else ""
    left = total - start
    return [
        f"run {out}: {how}",
        f"  data      {cfg.data.train}: {images} images, global batch {per * world} ({layout}), iterations "
        f"{start} -> {total} ({o.epochs:g} epochs of {o.epoch_length})",
        f"  model     {m.arch}, patch {m.patch_size}, {cfg.crops.global_size} px global / {cfg.crops.local_size} px "
        f"local crops x {cfg.crops.local_number}, {m.in_chans} channel(s): {millions(backbone)} backbone "
        f"parameters{head_text}",
        f"  device    {dev}",
        f"  estimate  timing the first iterations here for the {left} to run (next line)",
    ]


def estimate_line(cfg: DictConfig, device: torch.device, world: int, seconds_per_it: float, span: tuple[int, int],
                  total: int) -> str:
    """The run's time from its measured step: what the user plans by, so it says what it was measured on."""
    left = total - span[1]
    evals = left // cfg.eval.knn_every if cfg.eval.knn_every and cfg.eval.knn_train else 0
    extra = f", + {evals} periodic kNN evaluations" if evals else ""
    extra += " + the final kNN" if cfg.eval.final_knn else ""
    procs = f"{world} processes" if world > 1 else "1 process"
    return (f"  estimate  ~{human_duration(seconds_per_it * left)} for the {left} iterations left{extra}: "
            f"{seconds_per_it:.3g} s per iteration, timed on iterations {span[0] + 1}-{span[1]} on this device "
            f"({device.type}, {precision(cfg, device)}, {procs})")


def cpu_warning(cfg: DictConfig, device: torch.device, seconds: float) -> str | None:
    """A one-line warning when a run on the CPU would take hours: a GPU recipe started without a GPU."""
    if device.type != "cpu" or seconds < CPU_WARN_SECONDS:
        return None
    why = "no GPU found" if cfg.run.device == "auto" else "run.device=cpu"
    return (f"training on the CPU ({why}): this recipe ({cfg.model.arch}, {cfg.crops.global_size} px) needs "
            f"~{human_duration(seconds)} here. It is made for a GPU: run it where torch.cuda.is_available() is "
            "True, shorten optim.epochs, or use a CPU recipe (configs/fmnist_cpu.yaml). Ctrl-C stops it with a "
            "checkpoint.")


def row_line(row: dict, total: int, seconds_left: float | None) -> str:
    """One metrics row in words: iteration, loss and its terms, lr, speed, time left, kNN when measured."""
    terms = [f"{name} {row[key]:.3f}" for key, name in
             (("dino_global_loss", "dino"), ("dino_local_loss", "local"), ("ibot_loss", "ibot"),
              ("koleo_loss", "koleo")) if key in row]
    parts = [f"iteration {row['iteration']}/{total}",
             f"loss {row['loss']:.3f}" + (f" ({', '.join(terms)})" if terms else ""),
             f"lr {row['lr']:.2e}", f"{row['img_per_s']:.0f} img/s"]
    if seconds_left is not None:
        parts.append(f"{human_duration(seconds_left)} left")
    if "knn_top1" in row:
        parts.append(f"kNN {row['knn_top1']:.1f} %")
    if row.get("skipped_draws"):
        parts.append(f"{row['skipped_draws']} unreadable draws")
    return " | ".join(parts)
