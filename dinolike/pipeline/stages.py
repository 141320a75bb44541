"""The pipeline's stages: each calls the job of an existing command (`dinolike curate`, `train`, `distill`,
`eval`) in this process, on the previous stage's output, with the recipe and overrides the pipeline
config names.

A stage is built (config resolved and checked) before anything runs, so a typo in the eval overrides
fails in the first second, not after pretraining. What a stage reads from the stages before it is only
known once they ran (`inputs`): it is part of the stage's fingerprint, with the resolved config and the
fingerprints of the stages it builds on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dinolike.config import OPERATIONAL, ConfigError, load_config
from dinolike.pipeline.config import TRAIN_STAGES, layered_recipe, recipe_files
from dinolike.pipeline.fingerprint import digest, file_digest, git_commit
from dinolike.pipeline.lineage import STATE_DIR, now, read_state, recorded_digest, state_path, write_json
from dinolike.training.validate import check_train_config

log = logging.getLogger("dinolike.pipeline")
BASELINES = ("pixels", "random")


class StageError(RuntimeError):
    """A stage cannot run (an earlier stage is missing or failed); printed as one line."""


@dataclass
class Stage:
    """One stage as it will run: the command's config file and overrides, and the resolved config."""

    name: str
    recipe: list[str]  # the recipe files the pipeline config names
    config_file: Path  # what the command reads: the recipe, or the layered recipe written for it
    overrides: list[str]  # the user's, then the pipeline's (output folder, previous stage's output)
    config: dict[str, Any]  # resolved, for the fingerprint and lineage
    upstream: list[str] = field(default_factory=list)  # stages whose output it reads

    @property
    def config_fingerprint(self) -> str:
        return digest(self.name, self.config)


def stage_dir(out: Path, name: str) -> Path:
    return out / name


def newest_checkpoint(run_dir: Path) -> Path:
    found = sorted((run_dir / "checkpoints").glob("ckpt_*.pt"))
    if not found:
        raise StageError(f"{run_dir} holds no checkpoint: its stage did not finish")
    return found[-1]


def training_finished(out: Path, stage: Stage) -> bool:
    """Whether a training stage reached its last iteration: a run stopped by `run.time_limit_min` exits 0
    too, but its newest checkpoint is short of the schedule's end (and the next stage must not start)."""
    o = stage.config["optim"]
    total = int(round(o["epochs"] * o["epoch_length"]))
    try:
        return int(newest_checkpoint(stage_dir(out, stage.name)).stem.split("_")[-1]) >= total
    except (StageError, ValueError):
        return False


def manifest(out: Path) -> Path:
    return stage_dir(out, "curate") / "work" / "manifest.txt"


def _config_file(out: Path, name: str, files: list[Path]) -> Path:
    """The single recipe as it is, several layered into stages/<name>.recipe.yaml."""
    if len(files) == 1:
        return files[0]
    path = out / STATE_DIR / f"{name}.recipe.yaml"
    text = OmegaConf.to_yaml(OmegaConf.create(layered_recipe(files)))
    if not path.is_file() or path.read_text() != text:  # a rerun that changes nothing writes nothing
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def _teacher_stage(stages: list[str]) -> str | None:
    return "highres" if "highres" in stages else "pretrain" if "pretrain" in stages else None


def _injected(out: Path, name: str, stages: list[str], demo: bool) -> tuple[list[str], list[str]]:
    """(overrides the pipeline adds, stages read): where the stage writes, and what it reads."""
    here = stage_dir(out, name)
    if name == "curate":
        extra = [f"work_dir={here / 'work'}"]
        if demo:
            extra += [f"pool=[folder-nolabels:{here / 'demo' / 'pool'}]", f"seeds=[folder:{here / 'demo' / 'seeds'}]"]
        return extra, []
    extra, reads = [f"run.output_dir={here}"], []
    if "curate" in stages:  # every training stage reads the curated images
        extra.append(f"data.train=manifest:{manifest(out)}")
        reads.append("curate")
    if name == "highres" and "pretrain" in stages:
        extra.append(f"run.init_from={stage_dir(out, 'pretrain')}")
        reads.append("pretrain")
    if name == "distill" and (teacher := _teacher_stage(stages)) is not None:
        extra.append(f"distill.teacher={stage_dir(out, teacher)}")
        reads.append(teacher)
    return extra, reads


def _resolve(name: str, config_file: Path, overrides: list[str]) -> dict[str, Any]:
    if name == "curate":
        from dinolike.curation import config as curation_config
        cfg = curation_config.load_config(config_file, overrides)
    else:
        cfg = load_config(config_file, overrides)
        check_train_config(cfg)  # values, as `dinolike train` checks them, before any stage runs
    return OmegaConf.to_container(cfg, resolve=True)


def build_stages(cfg: DictConfig) -> list[Stage]:
    """Every stage of `cfg.stages`, its config loaded and checked by its command's strict loader."""
    out, names = Path(cfg.output_dir), [str(s) for s in cfg.stages]
    built = []
    for name in names:
        sec = cfg[name]
        if name == "eval":
            built.append(_eval_stage(cfg, names))
            continue
        files = recipe_files(sec.config)
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{name}.config: file not found: {missing[0]}")
        extra, reads = _injected(out, name, names, name == "curate" and int(sec.demo) > 0)
        overrides = [*map(str, sec.overrides), *extra]
        config_file = _config_file(out, name, files)
        try:
            resolved = _resolve(name, config_file, overrides)
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None
        if name == "curate":
            resolved["demo_originals"] = int(sec.demo)  # the pool it writes is an input of the stage
        built.append(Stage(name, [str(f) for f in files], config_file, overrides, resolved, reads))
    return built


def _eval_stage(cfg: DictConfig, names: list[str]) -> Stage:
    sec = cfg.eval
    trained = [s for s in names if s in TRAIN_STAGES]
    if not trained:
        raise ConfigError("stage 'eval' needs a train stage (pretrain, highres or distill) in stages to evaluate")
    bad = [b for b in sec.baselines if b not in BASELINES]
    if bad:
        raise ConfigError(f"eval.baselines must be a subset of {list(BASELINES)}, got {list(sec.baselines)}")
    if not sec.protocols:
        raise ConfigError(f"eval.protocols must list `dinolike eval` command lines, got {list(sec.protocols)}")
    overrides = [str(o) for o in sec.overrides]
    from dinolike.eval.config import RANDOM, EvalError, job_config, protocol_line, resolve_config
    from dinolike.eval.protocols import PROTOCOLS

    for line in map(str, sec.protocols):  # each line parsed and checked now, not after hours of training
        try:
            _, job, opts = protocol_line(line, list(PROTOCOLS))
            job_config("pixels", None, opts, job)
        except (ConfigError, EvalError) as e:
            raise ConfigError(f"eval.protocols: {e}") from None

    try:  # the eval commands' strict config (a model's: data.mean / std may be set): a typo fails now
        resolve_config(RANDOM, "vit_small", overrides)
    except EvalError as e:
        raise ConfigError(f"eval.overrides: {e}") from None
    resolved = OmegaConf.to_container(sec, resolve=True)
    resolved.pop("launch")  # where the job runs does not change the results
    return Stage("eval", [], Path(), overrides, resolved, trained)


# ------------------------------------------------------------------------------------------ inputs


def backbones(out: Path, name: str) -> dict[str, Path]:
    """Model name -> exported backbone of a finished train stage (distillation: every student)."""
    run = stage_dir(out, name)
    found = {name: run / "teacher_backbone.pth"}
    for p in sorted(run.glob("student*_backbone.pth")):
        found[f"{name}-{p.name.removesuffix('_backbone.pth')}"] = p
    return found


def inputs(out: Path, stage: Stage) -> dict[str, Path]:
    """The files this stage reads from the stages before it (they must have finished)."""
    for up in stage.upstream:
        st = read_state(out, up)
        if st is None or st["status"] != "done":
            raise StageError(f"stage {stage.name!r} reads the output of {up!r}, which has not finished: run it first")
    found = {"manifest": manifest(out)} if "curate" in stage.upstream else {}
    if stage.name == "eval":
        return {m: p for up in stage.upstream for m, p in backbones(out, up).items()}
    trained = [u for u in stage.upstream if u != "curate"]  # highres and distill start from a checkpoint
    return {**found, **({"checkpoint": newest_checkpoint(stage_dir(out, trained[0]))} if trained else {})}


# Settings that change how a stage runs, not what it produces (dinolike.config.OPERATIONAL: the loader gives
# the same batches with any worker count; a checkpoint interval or a progress bar changes no weight):
# changing them resumes the stage instead of starting it over.


def _without_operational(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a resolved config without the OPERATIONAL keys (absent ones are fine)."""
    out = json.loads(json.dumps(config))
    for dotted in OPERATIONAL:
        *parents, leaf = dotted.split(".")
        node = out
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def _portable(value: Any, out: str) -> Any:
    """`value` with the pipeline folder in its strings written as $OUTPUT_DIR: a moved folder is the same."""
    if isinstance(value, dict):
        return {k: _portable(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v, out) for v in value]
    if isinstance(value, str) and (value == out or value.startswith(out + os.sep)):
        return "$OUTPUT_DIR" + value[len(out):]
    if isinstance(value, str) and (out + os.sep) in value:  # an override string "key=/out/..."
        return value.replace(out + os.sep, "$OUTPUT_DIR" + os.sep)
    return value


def stage_fingerprint(out: Path, stage: Stage, upstream: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """(fingerprint, {input: path and fingerprint}): the stage's resolved config (less OPERATIONAL keys),
    the files it reads and the fingerprints of the stages it builds on (so a rerun upstream reruns it too)."""
    found = inputs(out, stage)
    ins = {k: {"path": os.path.relpath(p, out),
               "fingerprint": recorded_digest(out, p, stage.upstream) or file_digest(p)} for k, p in found.items()}
    ups = {u: upstream[u] for u in stage.upstream}
    portable = _portable(_without_operational(stage.config), str(out))
    return digest(stage.name, portable, {k: v["fingerprint"] for k, v in ins.items()}, ups), ins


def begin_stage(out: Path, stage: Stage, fp: str, ins: dict[str, Any], upstream: dict[str, str],
                bookkeeping: bool = True) -> dict[str, Any]:
    """Resume the stage's folder when it was started with the same fingerprint, else empty it (its
    checkpoints belong to other inputs and must not be resumed); mark it running. Returns its state."""
    prev, here = read_state(out, stage.name), stage_dir(out, stage.name)
    same = prev is not None and prev["fingerprint"] == fp
    state = {"stage": stage.name, "fingerprint": fp, "status": "running",
             "config_fingerprint": stage.config_fingerprint, "recipe": stage.recipe,
             "config_file": str(stage.config_file), "overrides": stage.overrides, "config": stage.config,
             "inputs": ins, "upstream": {u: upstream[u] for u in stage.upstream}, "git_commit": git_commit(),
             "started": prev["started"] if same else now()}
    if not bookkeeping:
        return state
    if same:
        log.info("%s: resuming (%s) in %s", stage.name, fp, here)
    else:
        if here.exists():  # moved aside, never deleted: the user decides what an old run is worth
            old = prev["fingerprint"] if prev else "unknown"
            aside = here.with_name(f"{here.name}.stale-{old}")
            if aside.exists():
                shutil.rmtree(aside)  # the same old run moved aside before (a second change back and forth)
            here.rename(aside)
            log.warning("%s: config or inputs changed (%s -> %s): starting over; the previous run is kept in %s "
                        "(delete it when no longer needed)", stage.name, old, fp, aside)
        log.info("%s: running (%s)", stage.name, fp)
    write_json(state_path(out, stage.name), state)
    return state


# ------------------------------------------------------------------------------------------ runners


def run_curate_demo(out: Path, cfg: DictConfig) -> int:
    """`dinolike curate demo` into curate/demo when `curate.demo` asks for it (once: its truth.json marks it)."""
    demo, n = stage_dir(out, "curate") / "demo", int(cfg.curate.demo)
    if n <= 0 or (demo / "truth.json").is_file():
        return 0
    from dinolike.curation.demo import write_demo_pool

    truth = write_demo_pool(demo, n_originals=n)
    print(json.dumps(truth["counts"]))
    return 0


def run_curate(out: Path, stage: Stage, cfg: DictConfig) -> int:
    """Every curation step (`dinolike curate all`), in this process."""
    from dinolike.curation.config import check_config
    from dinolike.curation.config import load_config as curation_config
    from dinolike.curation.steps import curate

    run_curate_demo(out, cfg)
    try:
        cur = curation_config(stage.config_file, stage.overrides)
        check_config(cur, "all")
    except ConfigError as e:
        print(f"dinolike curate: error: all: {e}", file=sys.stderr)
        return 2
    return curate(cur, "all")


def run_train(out: Path, stage: Stage, cfg: DictConfig) -> int:
    """The training job, in this process (it starts its own worker processes when the recipe asks)."""
    from dinolike.jobs.train import run_training, train_config

    del out, cfg
    command = "distill" if stage.name == "distill" else "train"
    try:
        train_cfg = train_config(stage.config_file, stage.overrides, distill=command == "distill")
    except ConfigError as e:
        print(f"dinolike {command}: error: {e}", file=sys.stderr)
        return 2
    return run_training(train_cfg, command)


def _headline(protocol: str, metrics: dict[str, Any]) -> float | None:
    """The one number of a protocol's table: kNN at k=20 (or the first k), else the test top-1."""
    if protocol == "knn":
        ks = sorted(int(k[1:-5]) for k in metrics if k.startswith("k") and k.endswith("_top1") and k[1:-5].isdigit())
        k = 20 if 20 in ks else (ks[0] if ks else None)
        return None if k is None else metrics[f"k{k}_top1"]
    return metrics.get("test_top1")


def run_eval(out: Path, stage: Stage, cfg: DictConfig) -> int:
    """Every protocol line on every exported backbone and baseline; results.json collects them."""
    sec, here = cfg.eval, stage_dir(out, "eval")
    from dinolike.eval.config import EvalError, job_config, protocol_line
    from dinolike.eval.features import FeatureError
    from dinolike.eval.protocols import PROTOCOLS

    models: dict[str, tuple[str, str | None]] = {b: (b, None) for b in sec.baselines}
    if "random" in models:  # the architecture of the first trained model, untrained
        models["random"] = ("random", str(stage_dir(out, stage.upstream[0]) / "config.yaml"))
    models.update({m: (str(p), None) for m, p in inputs(out, stage).items()})
    shared = {"train_dataset": str(sec.train_dataset), "val_dataset": str(sec.val_dataset),
              "cache_dir": str(out / "cache" / "features"), "progress": False,
              "limit_train": int(sec.limit_train) if int(sec.limit_train) > 0 else None,
              "limit_val": int(sec.limit_val) if int(sec.limit_val) > 0 else None}
    table: dict[str, dict[str, Any]] = {}
    for model, (pretrained, run_config) in models.items():
        table[model] = {"pretrained": os.path.relpath(pretrained, out) if os.sep in pretrained else pretrained}
        for line in map(str, sec.protocols):
            protocol, job, line_opts = protocol_line(line, list(PROTOCOLS))
            folder = here / model / "_".join(w.lstrip("-") for w in line.split())
            result = folder / "results.json"
            if not result.is_file():  # a rerun of the same stage (same fingerprint) keeps finished evals
                opts = [o for o in stage.overrides if pretrained != "pixels" or o.startswith("eval.")]
                try:
                    PROTOCOLS[protocol](job_config(pretrained, run_config, [*line_opts, *opts],
                                                   {**job, **shared, "output_dir": str(folder)}))
                except (EvalError, FeatureError, FileNotFoundError) as e:
                    log.error("eval %s on %s failed: %s", line, model, e)
                    return 2
            res = json.loads(result.read_text())
            table[model][line] = {"top1": _headline(protocol, res["metrics"]), "n_train": res["n_train"],
                                  "n_test": res["n_test"], "resolution": res.get("resolution")}
    doc = {"protocols": [str(p) for p in sec.protocols], "train_dataset": sec.train_dataset,
           "val_dataset": sec.val_dataset, "models": table}
    write_json(here / "results.json", doc)
    return 0


RUNNERS: dict[str, Callable[[Path, Stage, DictConfig], int]] = {
    "curate": run_curate, "pretrain": run_train, "highres": run_train, "distill": run_train, "eval": run_eval,
}


def artifacts(out: Path, name: str) -> list[Path]:
    """What a finished stage leaves for later stages and for people (recorded in lineage.json)."""
    here = stage_dir(out, name)
    if name == "curate":
        return [here / "work" / f for f in ("manifest.txt", "provenance.jsonl", "summary.json")]
    if name == "eval":
        return [here / "results.json", *sorted(here.glob("*/*/results.json"))]
    found = [newest_checkpoint(here), here / "config.yaml", here / "metrics.jsonl"]
    for p in backbones(out, name).values():
        found += [p, Path(f"{p}.json")]
    return [p for p in found if p.is_file()]
