"""Distillation vs from-scratch at equal wall-clock, and the high-res phase vs none, on Fashion-MNIST.

  python benchmarks/bench_phases.py --pretrained runs/fmnist_cpu --minutes 20          # both parts
  python benchmarks/bench_phases.py --pretrained runs/fmnist_cpu --only distill --minutes 20
  python benchmarks/bench_phases.py --pretrained runs/fmnist_cpu --only highres --phase-epochs 0.25

(a) distill: the student of configs/fmnist_distill.yaml (vit_pico) is distilled from the --pretrained run
    (the teacher) and, separately, pretrained from scratch with the default recipe (fmnist_cpu.yaml with
    the student's architecture). Each arm gets the same training budget (--minutes): a short calibration
    run measures its seconds per iteration, and `optim.epoch_length` is set so that its whole schedule
    (warmup, cosine) fits the budget (a time limit 15 % above it is the safety net). The teacher's own
    pretraining cost is not counted (the paper's setting: the teacher exists).
(b) highres: the --pretrained run continues for --phase-epochs more epochs at 2x the crop sizes
    (28 -> 56 px global, as configs/fmnist_highres.yaml), against a control that trains the same extra
    iterations at the original size, and against no further training at all.
Evaluation: weighted kNN (k=20) top-1 on the Fashion-MNIST test set with the train set as the bank, and a
linear probe (eval.linear, small lr grid) unless --no-linear; at 28 px for (a), at 28 and 56 px for (b).
Results are printed as markdown tables and written to --out/results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dinolike.checkpoints import files as ck  # noqa: E402
from dinolike.checkpoints.files import resolve_checkpoint  # noqa: E402
from dinolike.config import load_config  # noqa: E402
from dinolike.data.datasets import build_dataset  # noqa: E402
from dinolike.data.normalize import build_eval_transform  # noqa: E402
from dinolike.eval.features import FeatureSet, extract_features  # noqa: E402
from dinolike.eval.knn import knn_eval  # noqa: E402
from dinolike.eval.linear import linear_probe  # noqa: E402
from dinolike.eval.settings import eval_settings  # noqa: E402
from dinolike.interop import load_pretrained  # noqa: E402
from dinolike.training.loop import train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
QUIET = ["run.progress=false", "eval.knn_every=0", "eval.final_knn=false"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", default="runs/fmnist_cpu",
                   help="the low-res pretraining run (folder or checkpoint): teacher of (a), start of (b)")
    p.add_argument("--only", choices=["distill", "highres"], help="run one part only")
    p.add_argument("--minutes", type=float, default=20.0, help="training budget of each arm of (a)")
    p.add_argument("--phase-epochs", type=float, default=0.25,
                   help="extra epochs of the high-res phase (b) (fractions too)")
    p.add_argument("--calib-iters", type=int, default=12, help="iterations of each calibration run")
    p.add_argument("--eval-limit", type=int, default=None, help="first N train / test images only")
    p.add_argument("--no-linear", action="store_true", help="kNN only")
    p.add_argument("--out", default="runs/bench_phases", help="runs and results.json land here")
    p.add_argument("overrides", nargs="*",
                   help="key=value applied to every training run (e.g. data.limit=512 for a smoke test)")
    return p.parse_args(argv)


# ---- training ------------------------------------------------------------------------------------------
def fresh(out: Path) -> Path:
    """Every arm starts from nothing: a folder left by an earlier benchmark would be resumed."""
    shutil.rmtree(out, ignore_errors=True)
    return out


def run_training(recipe: Path | None, overrides: list[str]) -> tuple[float, Path]:
    """Train in this process; (wall seconds, newest checkpoint). A time-limited run still has one."""
    cfg = load_config(recipe, overrides)
    fresh(Path(cfg.run.output_dir))
    t0 = time.perf_counter()
    status = train(cfg)
    seconds = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"training {cfg.run.output_dir} exited with status {status}")
    return seconds, resolve_checkpoint(cfg.run.output_dir)


def seconds_per_iteration(recipe: Path, overrides: list[str], out: Path, iters: int) -> float:
    """Median over the log windows after the first (which holds start-up costs) of batch / img_per_s."""
    every = max(iters // 4, 1)
    args = [*overrides, f"run.output_dir={fresh(out)}", "optim.epochs=1", f"optim.epoch_length={iters}",
            f"run.log_every={every}", f"run.checkpoint_every={iters}"]
    cfg = load_config(recipe, args)
    if train(cfg) != 0:
        raise SystemExit(f"calibration run {out} failed")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows
    return statistics.median(cfg.data.batch_size / r["img_per_s"] for r in timed)


def budgeted(recipe: Path, overrides: list[str], out: Path, minutes: float, calib_iters: int) -> dict:
    """Train `recipe` with its whole schedule squeezed into `minutes` (epoch_length from a calibration)."""
    spi = seconds_per_iteration(recipe, overrides, out.with_name(out.name + "_calib"), calib_iters)
    epochs = load_config(recipe, overrides).optim.epochs
    iters = max(int(minutes * 60 / spi), int(epochs))
    args = [*overrides, f"run.output_dir={out}", f"optim.epoch_length={int(iters // epochs)}",
            f"run.time_limit_min={minutes * 1.15}", f"run.checkpoint_every={max(iters // 4, 1)}"]
    seconds, ckpt = run_training(recipe, args)
    it = ck.load_checkpoint(ckpt)["iteration"]
    print(f"  {out.name}: {spi:.3f} s/it -> {iters} iterations planned, {it} done in {seconds / 60:.1f} min",
          file=sys.stderr)
    return {"ckpt": str(ckpt), "train_min": seconds / 60, "sec_per_it": spi, "iterations": it}


# ---- evaluation ----------------------------------------------------------------------------------------
def features(model: torch.nn.Module, spec: str, size: int, limit: int | None, n_last: int) -> FeatureSet:
    mean, std = (0.286,), (0.353,)  # the Fashion-MNIST statistics every recipe here trains with
    ds = build_dataset(spec, channels=1, limit=limit)
    return extract_features(model, ds, build_eval_transform(size, size, mean, std), channels=1, mean=mean,
                            std=std, resolution=size, resize=size, n_last_blocks=n_last, batch_size=256,
                            progress=False)


def evaluate(ckpt: str, sizes: list[int], limit: int | None, linear: bool,
             which: str = "teacher") -> dict[int, dict[str, float]]:
    """{size: {knn, linear}} for a backbone of a training checkpoint: `teacher` is the kept one (the EMA
    teacher of pretraining, the EMA student of distillation), `student` the trained weights."""
    model, _ = load_pretrained(ckpt, which=which)
    out = {}
    for size in sizes:
        train_f = features(model, "fmnist:train", size, limit, 4 if linear else 1)
        test_f = features(model, "fmnist:test", size, limit, 4 if linear else 1)
        res = {"knn": knn_eval(train_f.knn_features(), train_f.labels, test_f.knn_features(), test_f.labels,
                               eval_settings("knn", ks=(20,)))["k20_top1"]}
        if linear:
            settings = eval_settings("linear", lrs=(1e-3, 1e-2, 0.1), epochs=10)
            res["linear"] = linear_probe(train_f, test_f, settings, seed=0, device="cpu")["test_top1"]
        out[size] = res
    return out


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


# ---- the two parts -------------------------------------------------------------------------------------
def bench_distill(args: argparse.Namespace, teacher: Path, out: Path) -> dict:
    student = load_config(CONFIGS / "fmnist_distill.yaml").model
    arch = [f"model.{k}={v}" for k, v in student.items() if v is not None and k != "pretrained_weights"]
    common = [*QUIET, *args.overrides]
    print(f"(a) distillation from {teacher} vs from scratch, {args.minutes} min each", file=sys.stderr)
    arms = {
        "distilled": budgeted(CONFIGS / "fmnist_distill.yaml", [*common, f"distill.teacher={teacher}"],
                              out / "distilled", args.minutes, args.calib_iters),
        "scratch": budgeted(CONFIGS / "fmnist_cpu.yaml", [*common, *arch], out / "scratch", args.minutes,
                            args.calib_iters),
    }
    arms["teacher"] = {"ckpt": str(teacher), "train_min": None, "iterations": ck.load_checkpoint(teacher)["iteration"]}
    for arm in arms.values():
        arm["eval"] = evaluate(arm["ckpt"], [28], args.eval_limit, not args.no_linear)
    print("\n| model | training | iterations | kNN top-1 (28 px) | linear top-1 (28 px) |")
    print("|---|---|---|---|---|")
    for name, a in arms.items():
        e = a["eval"][28]
        mins = "(given)" if a["train_min"] is None else f"{a['train_min']:.1f} min"
        print(f"| {name} | {mins} | {a['iterations']} | {_fmt(e['knn'])} | {_fmt(e.get('linear'))} |")
    gain = arms["distilled"]["eval"][28]["knn"] - arms["scratch"]["eval"][28]["knn"]
    print(f"\ndistilled - scratch (kNN): {gain:+.2f} points")
    return arms


def bench_highres(args: argparse.Namespace, pretrained: Path, out: Path) -> dict:
    recipe = out / "pretrained_config.yaml"  # the merged config the checkpoint was trained with
    OmegaConf.save(OmegaConf.create(json.loads(ck.load_checkpoint(pretrained)["config"])), recipe)
    src = load_config(recipe)
    c = src.crops
    hi = [f"crops.global_size={2 * c.global_size}", f"crops.local_size={2 * c.local_size}"]
    phase = [*QUIET, *args.overrides, f"run.init_from={pretrained}",
             f"optim.epochs={src.optim.epochs + args.phase_epochs}"]
    sizes = [c.global_size, 2 * c.global_size]
    print(f"(b) high-res phase: {args.phase_epochs} epoch(s) at {2 * c.global_size} px from {pretrained}",
          file=sys.stderr)
    arms = {"no phase": {"ckpt": str(pretrained), "train_min": 0.0}}
    for name, extra in (("high-res phase", hi), ("same iterations at low res", [])):
        seconds, ckpt = run_training(recipe, [*phase, *extra, f"run.output_dir={out / name.replace(' ', '_')}"])
        arms[name] = {"ckpt": str(ckpt), "train_min": seconds / 60}
        # near the end of the schedule the EMA momentum is ~1, so the kept teacher moves little in a
        # short phase: the student weights show what the phase itself learned
        arms[name + " (student)"] = {"ckpt": str(ckpt), "train_min": seconds / 60, "which": "student"}
    for arm in arms.values():
        arm["eval"] = evaluate(arm["ckpt"], sizes, args.eval_limit, not args.no_linear, arm.get("which", "teacher"))
    lo, hi_px = sizes
    print(f"\n| model | extra training | kNN {lo} px | kNN {hi_px} px | linear {lo} px | linear {hi_px} px |")
    print("|---|---|---|---|---|---|")
    for name, a in arms.items():
        e = a["eval"]
        print(f"| {name} | {a['train_min']:.1f} min | {_fmt(e[lo]['knn'])} | {_fmt(e[hi_px]['knn'])} | "
              f"{_fmt(e[lo].get('linear'))} | {_fmt(e[hi_px].get('linear'))} |")
    return arms


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pretrained = resolve_checkpoint(args.pretrained, what="--pretrained")
    results: dict = {"args": vars(args), "pretrained": str(pretrained)}
    t0 = time.perf_counter()
    if args.only in (None, "distill"):
        results["distill"] = bench_distill(args, pretrained, out)
    if args.only in (None, "highres"):
        results["highres"] = bench_highres(args, pretrained, out)
    results["total_min"] = (time.perf_counter() - t0) / 60
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\ntotal {results['total_min']:.1f} min; results in {out / 'results.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
