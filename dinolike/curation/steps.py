"""The steps as the CLI runs them: read inputs from the work dir, compute, write outputs atomically.

`embed` resumes shard by shard; `dedup`, `retrieve` and `sample` (curation/dedup_step.py, select_steps.py)
are sharded over parts of the memory-mapped pool and over torch.distributed ranks, each part resumable; each
records the fingerprint of its inputs so that a rerun with the same inputs is skipped. `build` streams the
admitted images into the manifest shard by shard.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from .dedup_step import load_dedup, step_dedup
from .embed_step import prepare_sets, run_embed, shard_set
from .index import set_threads
from .rows import open_view
from .select_steps import SAMPLE_METHOD, step_retrieve, step_sample
from .store import atomic_write, write_json, write_lines
from .workdir import done, require, step_dir

__all__ = ["STEPS", "run_step", "load_dedup", "step_dedup", "step_retrieve", "step_sample", "step_build"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- build


def _admitted(cfg: DictConfig, sources: list[str]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(pool rows [A] sorted, source index [A], per-source reason columns): the first source to admit an
    image wins. Only arrays: nothing here grows a Python object per pool image."""
    rows, src, pos, cols = [], [], [], []
    for si, step in enumerate(sources):
        if step == "dedup":
            ids = np.flatnonzero(load_dedup(cfg).keep)
            col: dict[str, np.ndarray] = {}
        elif step == "retrieve":
            require(cfg, "retrieve", "build")
            with np.load(step_dir(cfg, "retrieve") / "result.npz") as z:
                col = {k: z[k] for k in z.files}
            ids = col["ids"]
        else:
            require(cfg, "sample", "build")
            with np.load(step_dir(cfg, "sample") / "result.npz") as z:
                col = {"ids": z["ids"], "cluster": z["cluster"]}
            ids = col["ids"]
        rows.append(ids.astype(np.int64))
        src.append(np.full(len(ids), si, np.int64))
        pos.append(np.arange(len(ids)))
        cols.append(col)
    all_rows = np.concatenate(rows)
    uniq, first = np.unique(all_rows, return_index=True)  # first occurrence = earliest source
    return uniq, np.concatenate(src)[first], [np.concatenate(pos)[first], cols]  # type: ignore[list-item]


def _reason(step: str, col: dict[str, np.ndarray], j: int, seed_names: list[str]) -> str:
    if step == "dedup":
        return "first image of its duplicate group"
    if step == "sample":
        return f"balanced draw from level-1 cluster {int(col['cluster'][j])}"
    if col["method"][j] == SAMPLE_METHOD:
        return (f"sample-based: neighbour {int(col['rank'][j]) + 1} of seed {seed_names[col['source'][j]]} "
                f"(cosine {col['score'][j]:.3f})")
    return (f"cluster-based: cluster {int(col['source'][j])} holds {int(col['score'][j])} seeds "
            f"({int(col['rank'][j])} images)")


def step_build(cfg: DictConfig, force: bool = False) -> dict[str, Any]:
    """Write `manifest.txt` (what `dinolike train` reads), `provenance.jsonl` (one row per manifest line:
    which step admitted the image and why) and `summary.json` / `summary.md` (counts per step).

    Streams shard by shard: the names of a shard's admitted images are read from its path list when the
    writer reaches it, so a 100M pool never becomes a list of 100M strings."""
    del force  # always rewritten: it is cheap next to the steps it reads
    sources = list(cfg.build.sources)
    pool = open_view(shard_set(cfg, "pool"))
    ded = load_dedup(cfg)
    comp_size = np.bincount(ded.component, minlength=len(pool))  # [N] images per duplicate group
    rows, src, (pos, cols) = _admitted(cfg, sources)
    seed_names = [n for n, _ in open_view(shard_set(cfg, "seeds")).names(0, 1 << 62)] if "retrieve" in sources else []
    counts = {s: int((src == i).sum()) for i, s in enumerate(sources)}
    header = f"# curated by `dinolike curate` from {list(cfg.pool)}; provenance in provenance.jsonl"
    work = Path(cfg.work_dir)

    def lines(kind: str):  # noqa: ANN202 - a generator of text lines
        if kind == "manifest":
            yield header + "\n"
        for a in range(len(pool.arrays)):
            lo, hi = int(pool.offsets[a]), int(pool.offsets[a + 1])
            sel = np.flatnonzero((rows >= lo) & (rows < hi)) if len(rows) else np.zeros(0, np.int64)
            if not len(sel):
                continue
            names = pool.names(lo, hi)
            for t in sel:
                i = int(rows[t])
                name, label = names[i - lo]
                if kind == "manifest":
                    yield (f"{name}\t{label}" if cfg.build.labels and label >= 0 else name) + "\n"
                else:
                    step = sources[int(src[t])]
                    why = _reason(step, cols[int(src[t])], int(pos[t]), seed_names)
                    yield json.dumps({"path": name, "step": step, "why": why,
                                      "duplicate_group_size": int(comp_size[ded.component[i]])}) + "\n"

    atomic_write(work / "manifest.txt", lambda f: f.writelines(lines("manifest")))
    atomic_write(work / "provenance.jsonl", lambda f: f.writelines(lines("provenance")))
    n_shards = int(shard_set(cfg, "pool").read_items()["n_shards"])
    skipped = sum(len(shard_set(cfg, "pool")._marker_info(i)["skipped"]) for i in range(n_shards))
    summary = {
        "pool_listed": shard_set(cfg, "pool").read_items()["n_items"],
        "unreadable_skipped": skipped,
        "embedded": len(pool),
        "dedup": done(cfg, "dedup")["summary"],
        **{s: done(cfg, s)["summary"] for s in ("retrieve", "sample") if s in sources},
        "admitted_by": counts,
        "manifest": len(rows),
    }
    write_json(work / "summary.json", summary)
    write_lines(work / "summary.md", _report(summary))
    return summary


def _report(summary: dict[str, Any]) -> list[str]:
    d = summary["dedup"]
    out = ["# Curation summary", "", "| step | count |", "|---|---|",
           f"| pool images listed | {summary['pool_listed']} |",
           f"| unreadable, skipped | {summary['unreadable_skipped']} |",
           f"| embedded | {summary['embedded']} |",
           f"| duplicates removed (self-dedup) | {d['duplicates_removed']} |",
           f"| removed as copies of reference images (leaks) | {d['leaks_removed']} |",
           f"| kept after dedup | {d['kept']} |"]
    for s, n in summary["admitted_by"].items():
        out.append(f"| admitted by `{s}` | {n} |")
    out.append(f"| **manifest** | **{summary['manifest']}** |")
    return out


# ------------------------------------------------------------------------------------------------ all


def step_embed(cfg: DictConfig, force: bool = False) -> dict[str, Any]:
    del force  # complete shards are always kept; delete the shard files to recompute them
    out = run_embed(cfg)
    return {**out, "shards": prepare_sets(cfg)}


STEPS = {"embed": step_embed, "dedup": step_dedup, "retrieve": step_retrieve, "sample": step_sample,
         "build": step_build}


def run_step(cfg: DictConfig, step: str, force: bool = False) -> dict[str, Any]:
    """One step, or `all`: embed, dedup, the steps `build.sources` needs, then build."""
    if step == "all":
        order = ["embed", "dedup", *[s for s in ("retrieve", "sample") if s in cfg.build.sources], "build"]
        return {s: run_step(cfg, s, force) for s in order}
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; steps: {', '.join([*STEPS, 'all'])}")
    set_threads(int(cfg.index.threads))
    return STEPS[step](cfg, force)



def curate(cfg: DictConfig, step: str, force: bool = False) -> int:
    """`dinolike curate STEP` (and the pipeline's curate stage): run the step, record the config it ran with
    in the work dir, print its result as JSON; a problem the user can fix is one line and exit status 2."""
    import sys

    from dinolike.config import ConfigError

    from .store import StepOutputError

    try:
        result = run_step(cfg, step, force)
        write_lines(f"{cfg.work_dir}/config.yaml", OmegaConf.to_yaml(cfg).splitlines())
    except (ConfigError, StepOutputError, ValueError, FileNotFoundError) as e:
        print(f"dinolike curate: error: {step}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1, default=str))
    return 0
