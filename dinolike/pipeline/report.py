"""`report.md`: one page a person reads after a pipeline run, and its PNGs (curation counts, eval bars).

Built only from files the stages wrote (stages/*.json, the curation summary, eval/results.json), so it can
be rewritten after every stage, by whichever SLURM job finished last. Training curves come from the
caller (the plotting code is a command's).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPORT_DIR = "report"
# a training stage that logged fewer iterations than this (a short high-res phase) is a table in the
# report: a picture of one dot per panel says less than its numbers
MIN_CURVE_POINTS = 2
TABLE_KEYS = ("loss", "dino_global_loss", "dino_local_loss", "ibot_loss", "koleo_loss", "teacher_entropy",
              "student_mean_entropy", "lr", "knn_top1")


def _bars(path: Path, labels: list[str], groups: dict[str, list[float]], ylabel: str, title: str) -> Path:
    """Grouped horizontal bars (one group per label, one bar per series) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(groups), 1)
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.35 * len(labels) * n))
    for j, (series, values) in enumerate(groups.items()):
        ax.barh([i * (n + 1) + j for i in range(len(labels))], values, label=series)
    ax.set_yticks([i * (n + 1) + (n - 1) / 2 for i in range(len(labels))], labels)
    ax.invert_yaxis()
    ax.set_xlabel(ylabel)
    ax.set_title(title)
    if len(groups) > 1:
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def curation_rows(summary: dict[str, Any]) -> list[tuple[str, int]]:
    d = summary["dedup"]
    rows = [("pool images listed", summary["pool_listed"]), ("unreadable, skipped", summary["unreadable_skipped"]),
            ("duplicates removed", d["duplicates_removed"]), ("eval-set leaks removed", d["leaks_removed"]),
            ("kept after dedup", d["kept"])]
    rows += [(f"admitted by {s}", n) for s, n in summary["admitted_by"].items()]
    return [*rows, ("manifest", summary["manifest"])]


def _eval_table(results: dict[str, Any]) -> list[str]:
    protocols = results["protocols"]
    lines = ["| model | " + " | ".join(protocols) + " |", "|---" * (len(protocols) + 1) + "|"]
    best = {p: max((m[p]["top1"] for m in results["models"].values() if m[p]["top1"] is not None), default=None)
            for p in protocols}
    for name, m in results["models"].items():
        cells = []
        for p in protocols:
            v = m[p]["top1"]
            cells.append("-" if v is None else f"**{v:.2f}**" if v == best[p] else f"{v:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _metric_rows(run: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl, those of one iteration merged (a periodic kNN is its own row)."""
    by_iter: dict[int, dict[str, Any]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:  # a line cut short by a crash or a full disk is skipped, as eval/plot.py does
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("iteration"), int):
            by_iter[row["iteration"]] = {**by_iter.get(row["iteration"], {}), **row}
    return [by_iter[i] for i in sorted(by_iter)]


def _metrics_table(run: Path) -> list[str]:
    """The logged values of a short run, one row per logged iteration (instead of its curves)."""
    rows = _metric_rows(run)
    keys = [k for k in TABLE_KEYS if any(isinstance(r.get(k), int | float) for r in rows)]
    lines = ["| iteration | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in rows:
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), int | float) else "" for k in keys]
        lines.append(f"| {r['iteration']} | " + " | ".join(cells) + " |")
    return lines


def _train_line(run: Path) -> str:
    """Iterations, final loss and last periodic kNN of a run, from its metrics.jsonl."""
    rows = _metric_rows(run)
    if not rows:
        return "no metrics logged"
    last = rows[-1]
    knn = [r["knn_top1"] for r in rows if "knn_top1" in r]
    speed = [r["img_per_s"] for r in rows if "img_per_s" in r]
    parts = [f"iterations {rows[0]['iteration']}-{last['iteration']}", f"final loss {last['loss']:.3f}"]
    if speed:
        parts.append(f"{sum(speed) / len(speed):.0f} img/s")
    if knn:
        parts.append(f"last periodic kNN {knn[-1]:.1f} %")
    return ", ".join(parts)


def write_report(out: Path, pipeline: dict[str, Any], stages: list[str], curves: dict[str, Path]) -> Path:
    """Write out/report.md (and out/report/*.png) from what the finished stages left."""
    pngs = out / REPORT_DIR
    states = {s: json.loads(p.read_text()) for s in stages if (p := out / "stages" / f"{s}.json").is_file()}
    md = [f"# Pipeline report: `{out.name}`", "",
          f"Config `{pipeline.get('config_file')}`; lineage of every artifact in `lineage.json`.", "",
          "## Stages", "", "| stage | status | wall time | fingerprint | recipe | git commit |",
          "|---|---|---|---|---|---|"]
    for s in stages:
        st = states.get(s)
        if st is None:
            md.append(f"| {s} | not run | | | | |")
            continue
        wall = f"{st['seconds'] / 60:.1f} min" if st.get("seconds") is not None else ""
        recipe = ", ".join(f"`{Path(r).name}`" for r in st["recipe"]) or "-"
        md.append(f"| {s} | {st['status']} | {wall} | `{st['fingerprint']}` | {recipe} | `{st['git_commit'][:12]}` |")
    summary_file = out / "curate" / "work" / "summary.json"
    if states.get("curate", {}).get("status") == "done" and summary_file.is_file():
        rows = curation_rows(json.loads(summary_file.read_text()))
        png = _bars(pngs / "curation_counts.png", [r[0] for r in rows], {"images": [r[1] for r in rows]},
                    "images", "curation")
        md += ["", "## Curation", "", "| step | images |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows],
               "", f"![curation counts]({png.relative_to(out)})"]
    trained = [s for s in ("pretrain", "highres", "distill") if states.get(s, {}).get("status") == "done"]
    if trained:
        md += ["", "## Training"]
        for s in trained:
            md += ["", f"**{s}**: {_train_line(out / s)}."]
            if s in curves:
                md += ["", f"![{s} curves]({curves[s].relative_to(out)})"]
            elif (out / s / "metrics.jsonl").is_file():
                md += ["", *_metrics_table(out / s)]
    results_file = out / "eval" / "results.json"
    if states.get("eval", {}).get("status") == "done" and results_file.is_file():
        results = json.loads(results_file.read_text())
        models = list(results["models"])
        groups = {p: [results["models"][m][p]["top1"] or 0.0 for m in models] for p in results["protocols"]}
        png = _bars(pngs / "eval.png", models, groups, "top-1 %", f"{results['val_dataset']}")
        md += ["", "## Evaluation", "",
               f"Top-1 % on `{results['val_dataset']}` (train set `{results['train_dataset']}`); `pixels` and "
               "`random` (the pretrained architecture, untrained) are the baselines to beat.", "",
               *_eval_table(results), "", f"![eval]({png.relative_to(out)})"]
    path = out / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(md) + "\n")
    tmp.replace(path)
    return path
