"""The one training loop: pretraining, the high-res phase and distillation all run through `train()`.

Reading order: `train` builds the method (ssl.py or distill.py), optimizer, schedules and data, resumes,
then each iteration is `forward_loss -> backward -> clip -> step -> after_step (EMA)`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dinolike import dist, fsdp
from dinolike.config import to_container
from dinolike.train import checkpoint as ck
from dinolike.train.data import build_train_loader
from dinolike.train.export import export_backbone
from dinolike.train.optim import apply_schedule, build_optimizer
from dinolike.train.preempt import EXIT_REQUEUE, StopFlag
from dinolike.train.schedules import build_schedules

log = logging.getLogger("dinolike.train")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message names the iteration and the loss term."""


def build_method(cfg: DictConfig) -> nn.Module:
    if cfg.distill.teacher:
        from dinolike.train.distill import DistillMethod

        return DistillMethod(cfg)
    from dinolike.train.ssl import SSLMethod

    return SSLMethod(cfg)


def _check_finite(it: int, metrics: dict[str, torch.Tensor]) -> None:
    for name, v in metrics.items():
        if not math.isfinite(float(v.detach())):
            raise NonFiniteLossError(
                f"{name} is {float(v.detach())} at iteration {it}; the run stopped and the last checkpoint is intact. "
                "Lower optim.base_lr, raise teacher.warmup_temp_epochs or check the data."
            )


def _state(method: nn.Module, opt: torch.optim.Optimizer, it: int, cfg: DictConfig) -> dict:
    return {
        "model": {k: fsdp.model_state(v) for k, v in method.checkpointed_parts().items()},
        "optimizer": fsdp.optim_state(method.student, opt),
        "iteration": it,
        "config": ck.config_json(to_container(cfg)),
        "rng": ck.rng_state(),
    }


def _restore(method: nn.Module, opt: torch.optim.Optimizer | None, ckpt: dict, source: Path) -> None:
    from dinolike.models.load import check_state

    parts = method.checkpointed_parts()
    missing = sorted(set(parts) - set(ckpt["model"]))
    if missing:
        raise RuntimeError(f"{source} has no {missing} state; it was written by another kind of run")
    for name, module in parts.items():
        check_state(module, ckpt["model"][name], what=f"'{name}' in {source}")
        fsdp.load_model_state(module, ckpt["model"][name])
    if opt is not None:
        try:
            fsdp.load_optim_state(method.student, opt, ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise RuntimeError(f"optimizer state in {source} does not fit this model: {e}") from None


def _autocast(device: torch.device, cfg: DictConfig):
    if device.type == "cuda" and cfg.dist.mixed_precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # fp32 on CPU: bf16 matmuls are ~100x slower on CPUs without bf16


def train(cfg: DictConfig) -> int:
    """Run (or resume) the job the config describes. Returns a process exit status."""
    env = dist.init_distributed(cfg.run.device)
    out = Path(cfg.run.output_dir)
    ckpt_dir = out / "checkpoints"
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out / "config.yaml")
    torch.manual_seed(cfg.run.seed + env.rank)

    method = build_method(cfg)
    method.to(env.device)
    method.prepare_distributed(env)
    opt = build_optimizer(method.param_groups(), cfg.optim.betas, cfg.optim.fused)
    global_batch = cfg.data.batch_size * env.world_size
    sched = build_schedules(cfg, global_batch)

    start = 0
    resume_from = ck.list_checkpoints(ckpt_dir)[-1:] if cfg.run.resume else []
    if resume_from:
        ckpt = ck.load_checkpoint(resume_from[0])
        _restore(method, opt, ckpt, resume_from[0])
        ck.set_rng_state(ckpt["rng"])
        start = ckpt["iteration"]
        log.info("resumed from %s at iteration %d", resume_from[0], start)
    elif cfg.run.init_from:
        src = Path(cfg.run.init_from)
        ckpt = ck.load_checkpoint(src)
        _restore(method, opt, ckpt, src)
        start = ckpt["iteration"]  # the schedules continue where the previous phase stopped
        log.info("phase starts from %s at iteration %d", src, start)
    if start >= sched.total:
        if env.is_main:
            print(f"nothing to do: {out} already reached iteration {start} of {sched.total}", file=sys.stderr)
        _export(method, cfg, out, env)
        return 0

    loader = build_train_loader(cfg, env, start_position=start * global_batch)
    stop = StopFlag(cfg.run.time_limit_min).install()
    metrics_file = open(out / "metrics.jsonl", "a") if env.is_main else None
    bar = _progress(cfg, env, start, sched.total)
    window: dict[str, float] = {}
    n_window, skipped, t_window, imgs_window = 0, 0, time.perf_counter(), 0
    it = start
    params = [p for g in opt.param_groups for p in g["params"]]
    try:
        for batch in loader:
            if it >= sched.total:
                break
            skipped += batch["skipped"]
            if batch["batch_size"] == 0:  # every image of the batch was unreadable
                it += 1
                continue
            batch = method.to_device(batch, env.device)
            s = sched.at(it)
            apply_schedule(opt, s["lr"], s["last_layer_lr"], s["wd"])
            with _autocast(env.device, cfg):
                loss, metrics = method.forward_loss(batch, s)
            if env.device.type == "cpu" or (it + 1) % cfg.run.log_every == 0:
                _check_finite(it, metrics)  # a sync: every step on CPU, at log time on GPU
            opt.zero_grad(set_to_none=True)
            loss.backward()
            method.sync_gradients()
            if cfg.optim.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad, foreach=True)
            opt.step()
            method.after_step(s)
            it += 1
            n_window += 1
            imgs_window += batch["batch_size"] * env.world_size
            for k, v in metrics.items():
                window[k] = window.get(k, 0.0) + v.detach()
            if bar is not None:
                bar.update(1)
            if it % cfg.run.log_every == 0 or it == sched.total:
                row = {k: float(v) / n_window for k, v in window.items()}
                dt = time.perf_counter() - t_window
                row.update(iteration=it, img_per_s=imgs_window / dt, skipped=skipped,
                           **{k: s[k] for k in ("lr", "wd", "momentum", "teacher_temp")})
                row.update(method.periodic_eval(it, cfg, env))
                _check_finite(it, {k: torch.tensor(row[k]) for k in metrics})
                if metrics_file is not None:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{row['img_per_s']:.0f}")
                window, n_window, imgs_window, t_window = {}, 0, 0, time.perf_counter()
            reason = stop.should_stop()
            if it % cfg.run.checkpoint_every == 0 or it == sched.total or reason:
                _save(method, opt, it, cfg, ckpt_dir, env)
            if reason:
                if env.is_main:
                    print(f"\nstopped at iteration {it} ({reason}); checkpoint saved, run again to continue",
                          file=sys.stderr)
                return EXIT_REQUEUE if reason != "time_limit" else 0
    finally:
        stop.uninstall()
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
    _export(method, cfg, out, env)
    return 0


def _save(method: nn.Module, opt, it: int, cfg: DictConfig, ckpt_dir: Path, env: dist.DistEnv) -> None:
    state = _state(method, opt, it, cfg)
    if env.is_main:
        ck.save_checkpoint(ckpt_dir, it, state, cfg.run.keep_last)
    dist.barrier()


def _export(method: nn.Module, cfg: DictConfig, out: Path, env: dist.DistEnv) -> None:
    if env.is_main:
        export_backbone(method.kept_backbone(), cfg.model, out / "teacher_backbone.pth")
        extra = getattr(method, "extra_backbones", dict)()
        for name, (backbone, model_cfg) in extra.items():
            export_backbone(backbone, model_cfg, out / f"{name}_backbone.pth")


def _progress(cfg: DictConfig, env: dist.DistEnv, start: int, total: int):
    if not (cfg.run.progress and env.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True, file=sys.stderr)
