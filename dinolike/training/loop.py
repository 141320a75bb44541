"""The one training loop: pretraining, the high-res phase and distillation all run through `train()`.

Reading order: `train` builds the method (ssl.py or distill.py), optimizer, schedules and data, resumes,
then each iteration runs `train_step` (step.py): `forward_loss -> backward -> clip -> step -> after_step (EMA)`.
"""

from __future__ import annotations

import functools
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
from dinolike.checkpoints import dcp
from dinolike.checkpoints import files as ck
from dinolike.config import to_container
from dinolike.errors import DinolikeError
from dinolike.models.load import CheckpointMismatchError
from dinolike.training.collapse import CollapseError, CollapseWatch
from dinolike.training.data import build_batch_mover, build_skip_guard, build_train_loader, grey_scale_warning
from dinolike.training.estimate import StepTimer, estimate_seconds_per_iteration, human_duration
from dinolike.training.finish import export_checked
from dinolike.training.method import Method
from dinolike.training.optim import build_optimizer
from dinolike.training.preempt import EXIT_REQUEUE, StopFlag
from dinolike.training.rundir import check_output_dir, check_resume_config, write_config_atomically
from dinolike.training.schedules import build_schedules
from dinolike.training.skips import SkipGuard
from dinolike.training.step import native_cpu_bf16, train_step
from dinolike.training.summary import cpu_warning, estimate_line, row_line, start_lines
from dinolike.training.tracking import RunLog, Tracker, print_outputs

log = logging.getLogger("dinolike.train")


class NonFiniteLossError(DinolikeError, RuntimeError):
    """The loss became NaN or inf; the message names the iteration and the loss term."""


def build_method(cfg: DictConfig) -> Method:
    if cfg.distill.teacher:
        from dinolike.training.distill import DistillMethod

        return DistillMethod(cfg)
    from dinolike.training.ssl import SSLMethod

    return SSLMethod(cfg)


def _check_finite(it: int, metrics: dict[str, torch.Tensor]) -> None:
    """Raise on NaN/inf. `train_step` passes the metrics summed over ranks: a non-finite value on any rank
    is seen by all (a sum stays non-finite), so every rank stops together instead of the others waiting in
    a collective."""
    names = sorted(metrics)
    values = torch.stack([metrics[k].detach().float().reshape(()) for k in names])  # [n_metrics]
    for name, v in zip(names, values.tolist(), strict=True):
        if not math.isfinite(v):
            raise NonFiniteLossError(
                f"{name} is {v} at iteration {it} (summed over ranks); the run stopped and the last "
                "checkpoint is intact. Lower optim.base_lr, raise teacher.warmup_temp_epochs or check the data."
            )


def _global_window(window: dict[str, torch.Tensor], n: int, images: int,
                   device: torch.device) -> tuple[dict[str, float], int]:
    """Window means of the metrics averaged over ranks, and the image count summed over ranks.

    Each rank's loss is the mean over its slice of the global batch, so with equal slices the rank
    average is the loss of the global batch: the logged curve does not depend on the world size.
    """
    names = sorted(window)
    local = torch.stack([window[k].detach().double().reshape(()).to(device) / n for k in names]
                        + [torch.tensor(float(images), dtype=torch.float64, device=device)])  # [n + 1]
    total = dist.all_reduce_sum(local).tolist()
    world = torch.distributed.get_world_size() if dist.is_enabled() else 1
    return {k: v / world for k, v in zip(names, total, strict=False)}, int(total[-1])


def _any_rank_empty(batch: dict) -> bool:
    """True when the batch of this or another rank has no readable image: then every rank skips the
    step together (a lone skip would leave the others waiting in the gradient all-reduce)."""
    return bool(dist.host_all_reduce_max([int(batch["batch_size"] == 0)])[0])


def _state(method: nn.Module, opt: torch.optim.Optimizer, it: int, cfg: DictConfig, skips: SkipGuard) -> dict:
    """Collective (every rank calls). Sharded runs: the state outside the model (DCP writes the shards);
    otherwise the full state too (gathered to rank 0 under DDP), which rank 0 saves as one file."""
    meta = {
        "iteration": it,
        "config": ck.config_json(to_container(cfg)),
        "rng": ck.rng_state(),  # rank 0's
        "rng_ranks": dist.all_gather_objects(ck.rng_state()),  # every rank's (drop path differs per rank)
        "skips": skips.state_dict(),  # unreadable-image counts of the run so far (collective)
    }
    if fsdp.is_sharded(method.student):
        return meta
    return {"model": {k: fsdp.model_state(v) for k, v in method.checkpointed_parts().items()},
            "optimizer": fsdp.optim_state(method.student, opt), **meta}


def _restore_rng(ckpt: dict, env: dist.DistEnv, seed: int, it: int) -> None:
    """Each rank takes back its own RNG state; after a change of world size the ranks beyond rank 0
    start fresh, distinct streams (rank 0 keeps the saved one)."""
    per_rank = ckpt.get("rng_ranks")
    if per_rank is not None and len(per_rank) == env.world_size:
        ck.set_rng_state(per_rank[env.rank])
    elif env.is_main:
        ck.set_rng_state(ckpt["rng"])
    else:
        torch.manual_seed(seed + env.rank + 1_000_003 * it)


def _restore(method: nn.Module, opt: torch.optim.Optimizer | None, ckpt: dict, source: Path) -> None:
    from dinolike.models.load import check_state

    if ckpt.get("format") == "dcp":  # each rank reads its own part, resharded from any world size
        try:
            dcp.load_sharded(Path(ckpt["path"]), method, opt)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointMismatchError(f"{source} does not fit this model: {str(e).splitlines()[0]}") from None
        return
    parts = method.checkpointed_parts()
    missing = sorted(set(parts) - set(ckpt["model"]))
    if missing:
        raise CheckpointMismatchError(f"{source} has no {missing} state; it was written by another kind of run")
    for name, module in parts.items():
        check_state(module, ckpt["model"][name], what=f"'{name}' in {source}")
        fsdp.load_model_state(module, ckpt["model"][name])
    if opt is not None:
        try:
            fsdp.load_optim_state(method.student, opt, ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointMismatchError(f"optimizer state in {source} does not fit this model: {e}") from None


def train(cfg: DictConfig) -> int:
    """Run (or resume) the job the config describes. Returns a process exit status."""
    env = dist.init_distributed(cfg.run.device)
    out = Path(cfg.run.output_dir)
    check_output_dir(out)  # a file or a read-only folder: one line now, not a traceback later
    torch.manual_seed(cfg.run.seed + env.rank)
    with RunLog(out, env.is_main) as runlog:  # log.txt from here on: resume warnings, rows, the end or the error
        return _train(cfg, env, out, runlog)


def _train(cfg: DictConfig, env: dist.DistEnv, out: Path, runlog: RunLog) -> int:
    ckpt_dir = out / "checkpoints"
    if env.is_main and (warning := grey_scale_warning(cfg)):  # in log.txt too, not only on the terminal
        log.warning(warning)
    method = build_method(cfg)
    cfg = method.cfg  # the method may complete the config (distillation: the teacher's heads)
    method.to(env.device)
    method.prepare_distributed(env)
    if env.device.type == "cpu" and cfg.precision.cpu == "bf16" and not native_cpu_bf16():
        log.warning("precision.cpu=bf16: this CPU has no bf16 instructions; its bf16 matmuls are emulated and "
                    "far slower than fp32")
    if cfg.run.compile:  # blocks and heads, in place: state-dict keys and checkpoints are unchanged
        from dinolike.training.ssl import compile_step_modules

        compile_step_modules(method, block_mode=cfg.run.compile_mode)
    opt = build_optimizer(method.param_groups(), cfg.optim.betas, cfg.optim.fused)
    global_batch = cfg.data.batch_size * env.world_size
    sched = build_schedules(cfg, global_batch)

    start, skip_state, how = 0, None, "new run"
    resume_from = ck.newest_intact(ckpt_dir, main=env.is_main) if cfg.run.resume else None  # walks back past damage
    if resume_from:
        path, ckpt = resume_from
        saved_world = len(ckpt["rng_ranks"]) if ckpt.get("rng_ranks") is not None else None
        check_resume_config(ckpt["config"], to_container(cfg), path, cfg.run.allow_config_change, saved_world,
                            env.world_size)
        _restore(method, opt, ckpt, path)
        start, skip_state = ckpt["iteration"], ckpt.get("skips")
        _restore_rng(ckpt, env, cfg.run.seed, start)
        log.info("resumed from %s at iteration %d", path, start)
        how = f"resuming at iteration {start} from {path.name}"
    elif cfg.run.init_from:
        src = ck.resolve_checkpoint(cfg.run.init_from, what="run.init_from")
        ckpt = ck.load_checkpoint(src, model=False)
        _restore(method, opt, ckpt, src)
        start = ckpt["iteration"]  # the schedules continue where the previous phase stopped
        log.info("phase starts from %s at iteration %d", src, start)
        how = f"a phase starting at iteration {start} from {src}"
        if start >= sched.total:
            print(f"run.init_from {src} is at iteration {start}, but this phase ends at {sched.total} "
                  "(optim.epochs * optim.epoch_length): a phase must set a larger optim.epochs", file=sys.stderr)
            return 2
    if env.is_main:  # after the resume check: a refused resume leaves the run's config.yaml as it was
        write_config_atomically(OmegaConf.to_yaml(cfg), out / "config.yaml")
    if start >= sched.total:
        if env.is_main:
            print(f"nothing to do: {out} already reached iteration {start} of {sched.total}", file=sys.stderr)
        where = str(resume_from[0]) if resume_from else str(cfg.run.init_from)
        export_checked(method, cfg, out, env, CollapseWatch.from_config(cfg), start, where)  # exported again
        return 0

    loader = build_train_loader(cfg, env, start_position=start * global_batch)
    to_device = build_batch_mover(cfg, env.device)
    skips = build_skip_guard(cfg, loader)
    skips.load_state_dict(skip_state)
    if env.is_main:
        _say_start(cfg, env, method, runlog, out, how, len(loader.dataset.base), start, sched.total)
    stop = StopFlag(cfg.run.time_limit_min).install()
    metrics_file = open(out / "metrics.jsonl", "a") if env.is_main else None
    tracker = Tracker(cfg, out, env.is_main)  # TensorBoard, wandb
    bar = _progress(cfg, env, start, sched.total)
    window: dict[str, float] = {}
    n_window, t_window, imgs_window = 0, time.perf_counter(), 0
    t_start = time.perf_counter()
    it = start
    timer = StepTimer(start, env.device)
    clip_groups = method.grad_clip_groups()  # distillation: one per student
    watch = CollapseWatch.from_config(cfg)
    last_ckpt = ck.list_checkpoints(ckpt_dir)[-1:] or None
    may_be_empty = not getattr(loader.dataset.base, "always_readable", False)  # files: any may be unreadable
    try:
        for batch in loader:
            if it >= sched.total:
                break
            if (batch["batch_size"] == 0 if not (env.enabled and may_be_empty) else _any_rank_empty(batch)):
                # every image of a batch was unreadable: the step is skipped (on every rank), and the
                # readable images of the other ranks are counted as skipped too
                skips.add(batch, unused=batch["batch_size"])
                it += 1
                if it % cfg.run.log_every == 0:
                    skips.check(it)  # empty batches must not run on silently to the end
                continue
            skips.add(batch)
            batch = to_device(batch)
            s = sched.at(it)
            # the finite check is a sync (over ranks too): every step on CPU, at log time on GPU
            check = env.device.type == "cpu" or (it + 1) % cfg.run.log_every == 0
            metrics = train_step(method, opt, batch, s, env.device, clip_groups,
                                 check=functools.partial(_check_finite, it) if check else None)
            it += 1
            n_window += 1
            imgs_window += batch["batch_size"]
            for k, v in metrics.items():
                window[k] = window.get(k, 0.0) + v.detach()
            if bar is not None:
                bar.update(1)
            if (per_it := timer.tick(it, sched.total)) is not None:
                _say_estimate(cfg, env, runlog, per_it, timer.span, sched.total, bar)
            if it % cfg.run.log_every == 0 or it == sched.total:
                row, imgs = _global_window(window, n_window, imgs_window, env.device)
                dt = time.perf_counter() - t_window
                row.update(iteration=it, img_per_s=imgs / dt, **skips.check(it),
                           **{k: s[k] for k in ("lr", "wd", "momentum", "teacher_temp")})
                row.update(method.periodic_eval(it, cfg, env))  # every rank: feature extraction is sharded
                _check_finite(it, {k: torch.tensor(row[k]) for k in metrics})
                if metrics_file is not None:
                    _write_row(metrics_file, row, out)
                tracker.log(row)
                left = (sched.total - it) * (time.perf_counter() - t_start) / (it - start)
                runlog.say(row_line(row, sched.total, left), bar)
                warning = watch.update(it, row, str(last_ckpt[0]) if last_ckpt else None)  # same row, every rank
                if warning and env.is_main:
                    log.warning(warning)
                if bar is not None:
                    knn = {} if tracker.last_knn is None else {"knn": f"{tracker.last_knn:.1f}"}
                    bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{row['img_per_s']:.0f}", **knn)
                window, n_window, imgs_window, t_window = {}, 0, 0, time.perf_counter()
            reason = _agreed_stop(stop, it, cfg.run.log_every)
            periodic = it % cfg.run.checkpoint_every == 0 and not watch.suspect  # no checkpoint of a collapse
            if periodic or it == sched.total or reason:
                last_ckpt = [_save(method, opt, it, cfg, ckpt_dir, env, skips)]
            if reason:  # a stopped run still leaves the teacher of this iteration, if it tells images apart
                return _stop(method, cfg, out, env, watch, it, str(last_ckpt[0]), reason)
    finally:
        stop.uninstall()
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
        tracker.close()
    # constant embeddings: no export, and no older one left beside the run
    export_checked(method, cfg, out, env, watch, it, str(last_ckpt[0]) if last_ckpt else "no checkpoint")
    if env.is_main:
        runlog.say(f"finished: iteration {it} of {sched.total} in "
                   f"{human_duration(time.perf_counter() - t_start)} of training")
        print_outputs(out)
    return 0


def _say_start(cfg: DictConfig, env: dist.DistEnv, method: Method, runlog: RunLog, out: Path, how: str,
               images: int, start: int, total: int) -> None:
    """The start summary, and a warning up front when the CPU would take hours (rank 0)."""
    backbone = method.kept_backbone()
    teacher = getattr(method, "teacher", None)  # distillation: a frozen, often much larger, teacher
    per_it = estimate_seconds_per_iteration(cfg, backbone, env.device,
                                            teacher["backbone"] if isinstance(teacher, nn.ModuleDict) else None)
    heads = getattr(method, "student", None)
    head_parts = [m for name, m in heads.items() if name != "backbone"] if isinstance(heads, nn.ModuleDict) else []
    for line in start_lines(cfg, out=str(out.resolve()), how=how, images=images, world=env.world_size,
                            device=env.device, backbone=backbone,
                            heads=nn.ModuleList(head_parts) if head_parts else None, start=start, total=total):
        runlog.say(line)
    warning = cpu_warning(cfg, env.device, per_it * (total - start))  # days on a CPU: said before any step
    if warning:
        log.warning(warning)


def _say_estimate(cfg: DictConfig, env: dist.DistEnv, runlog: RunLog, per_it: float, span: tuple[int, int],
                  total: int, bar) -> None:
    """The estimate from the timed first iterations (rank 0 says it; every rank's step includes the others')."""
    runlog.say(estimate_line(cfg, env.device, env.world_size, per_it, span, total), bar)


def _write_row(metrics_file, row: dict, out: Path) -> None:
    """One metrics.jsonl line; a full disk is a one-line error naming the file, not a traceback."""
    try:
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
    except OSError as e:
        raise ck.RunWriteError(f"cannot write {out / 'metrics.jsonl'}: {e.strerror or e}; the newest "
                                      f"checkpoint in {out / 'checkpoints'} is intact") from None


def _agreed_stop(stop: StopFlag, it: int, every: int) -> str | None:
    """Stop only when every rank stops at the same iteration: ranks agree (MAX all-reduce) every
    `every` iterations, so a signal that reaches ranks at different times cannot split them."""
    if not dist.is_enabled():
        return stop.should_stop()
    if it % every:
        return None
    import torch.distributed as tdist

    flag = torch.tensor([1.0 if stop.should_stop() else 0.0], device=dist.current_device())
    tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
    if flag.item() and stop.requested is None:
        stop.requested = "peer"  # another rank got the signal
    return stop.requested if flag.item() else None


def _save(method: nn.Module, opt, it: int, cfg: DictConfig, ckpt_dir: Path, env: dist.DistEnv,
          skips: SkipGuard) -> Path:
    state = _state(method, opt, it, cfg, skips)
    if fsdp.is_sharded(method.student):  # DCP: every rank writes its own shards, nobody holds the full state
        path = ck.checkpoint_path(ckpt_dir, it, sharded=True)
        dcp.save_sharded(path, method, opt, state)
        if env.is_main:
            ck.prune(ckpt_dir, it, cfg.run.keep_last)
        dist.barrier()
        return path
    if env.is_main:
        ck.save_checkpoint(ckpt_dir, it, state, cfg.run.keep_last)
    dist.barrier()
    return ck.checkpoint_path(ckpt_dir, it)


def _stop(method: Method, cfg: DictConfig, out: Path, env: dist.DistEnv, watch: CollapseWatch, it: int,
          checkpoint: str, reason: str) -> int:
    """After a stop request's checkpoint: the checked export, one line, and the status (3: run me again;
    a time limit is the end of the run's budget: 0, or the end's CollapseError with constant embeddings)."""
    try:
        export_checked(method, cfg, out, env, watch, it, checkpoint)
        said = f"checkpoint saved and teacher of iteration {it} exported"
    except CollapseError as e:
        if reason == "time_limit":
            raise
        removed = " (its older export removed)" if "older export" in str(e) else ""
        said = f"checkpoint saved; the teacher was not exported: it gives every image the same embedding{removed}"
    if env.is_main:
        print(f"\nstopped at iteration {it} ({reason}); {said}, run again to continue", file=sys.stderr)
    return EXIT_REQUEUE if reason != "time_limit" else 0


def _progress(cfg: DictConfig, env: dist.DistEnv, start: int, total: int):
    if not (cfg.run.progress and env.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True, file=sys.stderr)
