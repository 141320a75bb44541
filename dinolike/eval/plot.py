"""`dinolike plot RUN_DIR`: training curves from RUN_DIR/metrics.jsonl as one PNG (RUN_DIR/curves.png).

One panel per logged quantity (each loss term, lr, teacher temperature, periodic kNN, ...), so a broken
run (a loss term that explodes, a schedule that is off) is visible at a glance.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# panels in this order when present; any other numeric key ending in _loss or starting with knn follows
PANELS: tuple[str, ...] = (
    "loss",
    "dino_global_loss",
    "dino_local_loss",
    "ibot_loss",
    "koleo_loss",
    "teacher_entropy",
    "student_mean_entropy",
    "lr",
    "wd",
    "momentum",
    "teacher_temp",
    "knn_top1",
    "img_per_s",
)
NCOLS = 3
PANEL_W_IN, PANEL_H_IN = 5.0, 3.5


def read_metrics(path: str | Path) -> tuple[list[dict], int]:
    """Parse metrics.jsonl -> (records sorted by iteration, number of unreadable lines skipped).

    Records of the same iteration are merged (periodic kNN may be its own line); after a resume the
    same iterations are logged again and the later values win.
    """
    by_iter: dict[int, dict] = {}
    bad = 0
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                it = int(rec["iteration"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                bad += 1
                continue
            by_iter[it] = {**by_iter.get(it, {}), **rec}  # eval records may share an iteration
    return [by_iter[i] for i in sorted(by_iter)], bad


def panel_keys(records: list[dict]) -> list[str]:
    """The quantities to plot: known ones in a fixed order, then extra loss/knn keys alphabetically."""
    present = {
        k
        for r in records
        for k, v in r.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }
    keys = [k for k in PANELS if k in present]
    extra = sorted(k for k in present - set(keys) if k.endswith("_loss") or k.startswith("knn"))
    return keys + extra


ENTROPY_PANELS = ("teacher_entropy", "student_mean_entropy")  # nats over the K prototypes: at most ln K


def prototypes(run_dir: Path) -> int | None:
    """K, the DINO head's prototype count, from the run's config.yaml (None without one)."""
    from omegaconf import OmegaConf

    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        return None
    k = OmegaConf.select(OmegaConf.load(cfg), "heads.out_dim")
    return int(k) if k else None


def curves_figure(run_dir: str | Path, dpi: int = 100) -> Any:
    """The matplotlib Figure of RUN_DIR/metrics.jsonl: NCOLS x ceil(panels / NCOLS) panels of
    PANEL_W_IN x PANEL_H_IN inches. Constrained layout keeps the run's name (the figure title) clear of the
    panels; values are written out (no "+5.54" offset above an axis, which reads as a wrong number); the
    entropy panels carry ln K, the entropy of a uniform prediction, that a collapsing run sits at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    records, bad = read_metrics(metrics)
    if bad:
        log.warning("%s: skipped %d unreadable lines", metrics, bad)
    keys = panel_keys(records)
    if not keys:
        raise ValueError(f"{metrics} holds no numeric metrics to plot")
    k = prototypes(run_dir)
    nrows = math.ceil(len(keys) / NCOLS)
    fig, axes = plt.subplots(nrows, NCOLS, figsize=(NCOLS * PANEL_W_IN, nrows * PANEL_H_IN), dpi=dpi, squeeze=False,
                             layout="constrained")
    for ax, key in zip(axes.flat, keys, strict=False):
        pts = [
            (r["iteration"], float(r[key]))
            for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))
        ]
        xs, ys = zip(*pts, strict=True)
        marker = "o" if key.startswith("knn") or len(pts) < 20 else None
        ax.plot(xs, ys, marker=marker, markersize=3, linewidth=1)
        if key in ENTROPY_PANELS and k:
            ax.axhline(math.log(k), color="grey", linestyle="--", linewidth=1, label=f"ln K = {math.log(k):.2f}")
            ax.legend(loc="best", fontsize="small")
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if key.endswith("_loss") or key == "loss":
            if min(ys) > 0 and max(ys) / min(ys) > 50:
                ax.set_yscale("log")
        if isinstance(ax.yaxis.get_major_formatter(), ScalarFormatter):
            ax.yaxis.get_major_formatter().set_useOffset(False)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(str(run_dir.name))
    return fig


def plot_curves(run_dir: str | Path, out: str | Path | None = None, dpi: int = 100) -> Path:
    """Render RUN_DIR/metrics.jsonl to a PNG (`curves_figure`); returns its path. The image size is
    predictable: width = NCOLS * PANEL_W_IN * dpi, height = rows * PANEL_H_IN * dpi."""
    import matplotlib.pyplot as plt

    fig = curves_figure(run_dir, dpi)
    out_path = Path(out) if out is not None else Path(run_dir) / "curves.png"
    fig.savefig(out_path, dpi=dpi)
    plt.close(fig)
    return out_path
