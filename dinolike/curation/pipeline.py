"""The steps as the CLI runs them: read inputs from the work dir, compute, write outputs atomically.

Each of `dedup`, `retrieve` and `sample` records a fingerprint of everything it was computed from (its
config sections and the fingerprints of its inputs): a rerun with the same inputs is skipped, a rerun
after a config change recomputes. `embed` resumes shard by shard.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from .config import section_fingerprint
from .dedup import DedupResult, deduplicate
from .embed import load_set, prepare_sets, run_embed, set_specs, shard_set
from .index import set_threads
from .retrieve import cluster_based, sample_based
from .sample import balanced_sample, hierarchical_kmeans
from .store import StepOutputError, save_npz, write_json, write_lines

__all__ = ["STEPS", "run_step", "load_dedup", "step_dedup", "step_retrieve", "step_sample", "step_build"]

log = logging.getLogger(__name__)
SAMPLE_METHOD, CLUSTER_METHOD = 0, 1


def _dir(cfg: DictConfig, step: str) -> Path:
    return Path(cfg.work_dir) / step


def _embeddings_fingerprint(cfg: DictConfig, names: tuple[str, ...]) -> str:
    """Identity of the embedded sets: item lists and every shard marker (rows, skipped, embedder)."""
    parts: list[Any] = []
    for name in names:
        if not set_specs(cfg, name):
            continue
        shards = shard_set(cfg, name)
        info = shards.read_items()
        for i in range(int(info["n_shards"])):
            if not shards.marker(i).is_file():
                raise StepOutputError(f"{shards.npy(i)} is not complete: run (or finish) the `embed` step first")
            parts.append(json.loads(shards.marker(i).read_text()))
        parts.append(info)
    return section_fingerprint(parts)


def _done(cfg: DictConfig, step: str) -> dict[str, Any] | None:
    path = _dir(cfg, step) / "done.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _up_to_date(cfg: DictConfig, step: str, fingerprint: str, force: bool) -> bool:
    done = _done(cfg, step)
    if done is not None and done["fingerprint"] == fingerprint and not force:
        log.info("%s: up to date (%s), skipped", step, _dir(cfg, step))
        return True
    return False


def _require(cfg: DictConfig, step: str, before: str) -> dict[str, Any]:
    done = _done(cfg, step)
    if done is None:
        raise StepOutputError(f"`{before}` needs the output of `{step}` in {cfg.work_dir}: run `{step}` first")
    return done


# ---------------------------------------------------------------------------------------------- dedup


def _dedup_fingerprint(cfg: DictConfig) -> str:
    return section_fingerprint(cfg.dedup, cfg.index, cfg.seed, _embeddings_fingerprint(cfg, ("pool", "references")))


def step_dedup(cfg: DictConfig, force: bool = False) -> dict[str, Any]:
    fp = _dedup_fingerprint(cfg)
    if _up_to_date(cfg, "dedup", fp, force):
        return _done(cfg, "dedup")["summary"]
    t0 = time.perf_counter()
    emb, _, _, _ = load_set(cfg, "pool")
    refs = load_set(cfg, "references")[0] if set_specs(cfg, "references") else None
    res = deduplicate(emb, refs, cfg.dedup, cfg.index, int(cfg.seed), bool(cfg.embed.progress))
    summary = {**res.summary(), "seconds": round(time.perf_counter() - t0, 2)}
    out = _dir(cfg, "dedup")
    save_npz(out / "result.npz", keep=res.keep, component=res.component, leak=res.leak, ref_sim=res.ref_sim,
             ref_id=res.ref_id, n_edges=np.int64(res.n_edges))
    write_json(out / "done.json", {"fingerprint": fp, "summary": summary})
    return summary


def load_dedup(cfg: DictConfig) -> DedupResult:
    _require(cfg, "dedup", "this step")
    with np.load(_dir(cfg, "dedup") / "result.npz") as z:
        return DedupResult(z["keep"], z["component"], z["leak"], z["ref_sim"], z["ref_id"], int(z["n_edges"]))


# ------------------------------------------------------------------------------------------- retrieve


def step_retrieve(cfg: DictConfig, force: bool = False) -> dict[str, Any]:
    if not set_specs(cfg, "seeds"):
        raise StepOutputError("`retrieve` needs seed images: set `seeds` (a list of dataset specs)")
    methods = list(cfg.retrieve.methods)
    if not methods or set(methods) - {"sample", "cluster"}:
        raise ValueError(f"retrieve.methods must be a non-empty subset of [sample, cluster], got {methods}")
    fp = section_fingerprint(cfg.retrieve, cfg.index, cfg.seed, _require(cfg, "dedup", "retrieve")["fingerprint"],
                             _embeddings_fingerprint(cfg, ("seeds",)))
    if _up_to_date(cfg, "retrieve", fp, force):
        return _done(cfg, "retrieve")["summary"]
    t0 = time.perf_counter()
    emb = load_set(cfg, "pool")[0]
    seeds = load_set(cfg, "seeds")[0]
    kept = np.flatnonzero(load_dedup(cfg).keep)  # retrieval runs on the deduplicated pool
    pool = emb[kept]
    del emb
    r = cfg.retrieve
    cols: dict[str, list[np.ndarray]] = {"ids": [], "method": [], "source": [], "score": [], "rank": []}
    summary: dict[str, Any] = {"seeds": len(seeds), "pool_after_dedup": len(kept)}
    found = []
    if "sample" in methods:
        found.append((SAMPLE_METHOD, sample_based(pool, seeds, int(r.k), float(r.min_similarity), cfg.index,
                                                  int(cfg.seed), bool(cfg.embed.progress))))
        summary["sample_based"] = len(found[-1][1].ids)
    if "cluster" in methods:
        got, stats = cluster_based(pool, seeds, int(r.n_clusters), int(r.min_seeds), int(r.per_cluster),
                                   int(r.kmeans_iters), int(cfg.seed), cfg.index.gpu, int(r.kmeans_train_per_cluster))
        found.append((CLUSTER_METHOD, got))
        summary.update({"cluster_based": len(got.ids), **{f"cluster_{k}": v for k, v in stats.items()}})
    for method, got in found:
        cols["ids"].append(kept[got.ids])
        cols["method"].append(np.full(len(got.ids), method, np.int64))
        cols["source"].append(got.source)
        cols["score"].append(got.score)
        cols["rank"].append(got.rank)
    arrays = {k: np.concatenate(v) for k, v in cols.items()}
    summary["union"] = int(len(np.unique(arrays["ids"])))
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    out = _dir(cfg, "retrieve")
    save_npz(out / "result.npz", **arrays)
    write_json(out / "done.json", {"fingerprint": fp, "summary": summary})
    return summary


# --------------------------------------------------------------------------------------------- sample


def step_sample(cfg: DictConfig, force: bool = False) -> dict[str, Any]:
    fp = section_fingerprint(cfg.sample, cfg.index.gpu, cfg.seed, _require(cfg, "dedup", "sample")["fingerprint"])
    if _up_to_date(cfg, "sample", fp, force):
        return _done(cfg, "sample")["summary"]
    t0 = time.perf_counter()
    kept = np.flatnonzero(load_dedup(cfg).keep)
    pool = load_set(cfg, "pool")[0][kept]
    levels = [int(k) for k in cfg.sample.levels]
    parents = hierarchical_kmeans(pool, levels, int(cfg.sample.kmeans_iters), int(cfg.seed), cfg.index.gpu)
    ids, leaf = balanced_sample(parents, int(cfg.sample.target), int(cfg.seed))
    summary = {"pool_after_dedup": len(kept), "levels": [len(np.unique(p)) for p in parents],
               "sampled": len(ids), "seconds": round(time.perf_counter() - t0, 2)}
    out = _dir(cfg, "sample")
    save_npz(out / "result.npz", ids=kept[ids], cluster=leaf, pool_ids=kept, pool_cluster=parents[0])
    write_json(out / "done.json", {"fingerprint": fp, "summary": summary})
    return summary


# ---------------------------------------------------------------------------------------------- build


def step_build(cfg: DictConfig, force: bool = False) -> dict[str, Any]:
    """Write `manifest.txt` (what `dinolike train` reads), `provenance.jsonl` (one row per manifest line:
    which step admitted the image and why) and `summary.json` / `summary.md` (counts per step)."""
    sources = list(cfg.build.sources)
    if not sources or set(sources) - {"dedup", "retrieve", "sample"}:
        raise ValueError(f"build.sources must be a non-empty subset of [dedup, retrieve, sample], got {sources}")
    _, names, labels, skipped = load_set(cfg, "pool")
    ded = load_dedup(cfg)
    comp_size = np.bincount(ded.component, minlength=len(names))[ded.component]  # [N]
    why: dict[int, tuple[str, str]] = {}  # pool row -> (step, reason); the first source to admit it wins
    for step in sources:
        if step == "dedup":
            for i in np.flatnonzero(ded.keep):
                why.setdefault(int(i), ("dedup", "first image of its duplicate group"))
        elif step == "retrieve":
            _require(cfg, "retrieve", "build")
            seed_names = load_set(cfg, "seeds")[1]
            with np.load(_dir(cfg, "retrieve") / "result.npz") as z:
                for i, m, s, sc, rk in zip(z["ids"], z["method"], z["source"], z["score"], z["rank"], strict=True):
                    if m == SAMPLE_METHOD:
                        reason = f"sample-based: neighbour {int(rk) + 1} of seed {seed_names[s]} (cosine {sc:.3f})"
                    else:
                        reason = f"cluster-based: cluster {int(s)} holds {int(sc)} seeds ({int(rk)} images)"
                    why.setdefault(int(i), ("retrieve", reason))
        else:
            _require(cfg, "sample", "build")
            with np.load(_dir(cfg, "sample") / "result.npz") as z:
                for i, c in zip(z["ids"], z["cluster"], strict=True):
                    why.setdefault(int(i), ("sample", f"balanced draw from level-1 cluster {int(c)}"))
    rows = sorted(why)
    lines, prov = [], []
    for i in rows:
        line = f"{names[i]}\t{labels[i]}" if cfg.build.labels and labels[i] >= 0 else names[i]
        lines.append(line)
        step, reason = why[i]
        prov.append(json.dumps({"path": names[i], "step": step, "why": reason,
                                "duplicate_group_size": int(comp_size[i])}))
    work = Path(cfg.work_dir)
    counts = {s: sum(1 for i in rows if why[i][0] == s) for s in sources}
    summary = {
        "pool_listed": shard_set(cfg, "pool").read_items()["n_items"],
        "unreadable_skipped": len(skipped),
        "embedded": len(names),
        "dedup": _done(cfg, "dedup")["summary"],
        **{s: _done(cfg, s)["summary"] for s in ("retrieve", "sample") if s in sources},
        "admitted_by": counts,
        "manifest": len(lines),
    }
    header = [f"# curated by `python -m curation` from {list(cfg.pool)}; provenance in provenance.jsonl"]
    write_lines(work / "manifest.txt", header + lines)
    write_lines(work / "provenance.jsonl", prov)
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

