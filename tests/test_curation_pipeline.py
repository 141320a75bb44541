"""The curation pipeline end to end on real Fashion-MNIST files with known duplicates and eval leaks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dinolike.commands.curate import main
from dinolike.curation.config import load_config
from dinolike.curation.demo import write_demo_pool
from dinolike.curation.embed_step import load_set
from dinolike.curation.steps import load_dedup
from dinolike.data.datasets import build_dataset

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "curation" / "fmnist_demo.yaml"


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Demo pool (3000 originals, 300 copies, 50 test-image copies, 1 corrupt file) through all steps."""
    base = tmp_path_factory.mktemp("curation")
    truth = write_demo_pool(base / "demo")
    work = base / "work"
    overrides = [f"work_dir={work}", f"pool=[folder-nolabels:{base / 'demo' / 'pool'}]",
                 f"seeds=[folder:{base / 'demo' / 'seeds'}]", "embed.progress=false", "build.sources=[retrieve]"]
    assert main(["all", "--config", str(DEMO), *overrides]) == 0
    cfg = load_config(DEMO, overrides)
    names = load_set(cfg, "pool")[1]
    rel = [str(Path(n).relative_to(base / "demo")) for n in names]
    return {"base": base, "work": work, "truth": truth, "cfg": cfg, "overrides": overrides, "rel": rel}


def test_dedup_removes_copies_and_leaks_keeps_originals(curated: dict) -> None:
    files = curated["truth"]["files"]
    assert curated["truth"]["max_copy_distance"] < curated["truth"]["margin"]  # copies are unambiguous
    res = load_dedup(curated["cfg"])
    kind = np.array([files[r]["kind"] for r in curated["rel"]])
    group = np.array([files[r].get("group", -1) for r in curated["rel"]])
    in_group = group >= 0
    survivors = np.bincount(group[in_group], weights=res.keep[in_group], minlength=int(group.max()) + 1)
    copied = np.unique(group[kind == "copy"])
    assert len(copied) == curated["truth"]["counts"]["copies"]
    removed = (survivors[copied] <= 1).mean()  # an original and its copy: at most one left
    lost = (survivors == 0).mean()  # a group (original + copies) with nothing left was wrongly removed
    assert removed >= 0.99, f"only {removed:.3f} of the injected duplicates removed"
    assert lost <= 0.01, f"{lost:.3f} of the originals wrongly removed"
    leaked = res.keep[kind == "test_copy"]
    assert (kind == "test_copy").sum() == 50 and not leaked.any(), f"{leaked.sum()} test-image copies kept"
    assert res.leak[kind == "test_copy"].all()


def test_retrieval_precision_and_provenance(curated: dict) -> None:
    files, work = curated["truth"]["files"], curated["work"]
    classes = set(curated["truth"]["seed_classes"])
    prov = [json.loads(line) for line in (work / "provenance.jsonl").read_text().splitlines()]
    labels = [files[str(Path(p["path"]).relative_to(curated["base"] / "demo"))]["label"] for p in prov]
    assert len(prov) >= 200
    precision = np.mean([lab in classes for lab in labels])
    assert precision >= 0.95, f"retrieval precision {precision:.3f}"
    for method in ("sample-based", "cluster-based"):
        got = [lab for p, lab in zip(prov, labels, strict=True) if p["why"].startswith(method)]
        assert got, f"no image admitted by {method} retrieval"
    assert all(p["step"] == "retrieve" for p in prov)


def test_manifest_reads_and_summary_counts(curated: dict) -> None:
    work = curated["work"]
    ds = build_dataset(f"manifest:{work / 'manifest.txt'}")
    prov = (work / "provenance.jsonl").read_text().splitlines()
    assert len(ds) == len(prov) and ds.paths == [json.loads(p)["path"] for p in prov]
    img, _ = ds[0]
    assert img is not None and img.size == (28, 28)
    summary = json.loads((work / "summary.json").read_text())
    assert summary["unreadable_skipped"] == 1  # the corrupt file is counted, not fatal
    assert summary["pool_listed"] == summary["embedded"] + 1
    d = summary["dedup"]
    assert d["kept"] + d["duplicates_removed"] + d["leaks_removed"] == summary["embedded"]
    assert summary["manifest"] == len(ds)
    assert "leaks" in (work / "summary.md").read_text()


def test_rerun_skips_finished_steps_and_sample_is_balanced(curated: dict) -> None:
    cfg, work = curated["cfg"], curated["work"]
    before = (work / "dedup" / "result.npz").stat().st_mtime_ns
    assert main(["dedup", "--config", str(DEMO), *curated["overrides"]]) == 0
    assert (work / "dedup" / "result.npz").stat().st_mtime_ns == before  # up to date: not recomputed
    assert main(["sample", "--config", str(DEMO), *curated["overrides"], "sample.target=600",
                 "sample.levels=[40]", "sample.resample_steps=[0]", "sample.sample_size=[5]"]) == 0
    with np.load(work / "sample" / "result.npz") as z:
        ids, cluster, pool_cluster = z["ids"], z["cluster"], z["pool_cluster"]
    keep = load_dedup(cfg).keep
    assert len(ids) == 600 and len(np.unique(ids)) == 600 and keep[ids].all()
    sizes = np.bincount(pool_cluster)  # images per level-1 cluster in the deduplicated pool
    per = np.bincount(cluster, minlength=len(sizes))
    assert (per <= sizes).all()
    # balanced (one level): every cluster gives min(its size, L) for one water level L (+1 for the remainder)
    level = per[per < sizes].min()
    assert (per >= np.minimum(sizes, level)).all() and (per <= np.minimum(sizes, level + 1)).all()
    assert (sizes > level + 1).any()  # the cap did bite: big clusters were cut down


def test_unknown_key_is_rejected_by_name(curated: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dedup", "--config", str(DEMO), *curated["overrides"], "dedup.treshold=0.5"]) == 2
    assert "dedup.treshold" in capsys.readouterr().err


def test_curated_manifest_trains(curated: dict, tmp_path: Path) -> None:
    """`dinolike train` runs on the curated manifest; its teacher then embeds as a `backbone` embedder."""
    manifest = curated["work"] / "manifest.txt"
    cmd = [sys.executable, "-m", "dinolike.cli", "train", "--config", str(ROOT / "configs" / "fmnist_smoke.yaml"),
           f"data.train=manifest:{manifest}", f"run.output_dir={tmp_path / 'run'}", "optim.epochs=1",
           "optim.epoch_length=3", "optim.warmup_epochs=0", "teacher.warmup_temp_epochs=0", "data.batch_size=16"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["iteration"] == 3 and np.isfinite(rows[-1]["loss"])
    work = tmp_path / "bb"
    ov = [f"work_dir={work}", f"pool=[manifest:{manifest}]", "references=[]", "seeds=[]", "embed.progress=false",
          "embed.embedder=backbone", f"embed.backbone.checkpoint={tmp_path / 'run' / 'teacher_backbone.pth'}",
          "embed.backbone.img_size=28", "embed.shard_size=256"]
    assert main(["embed", "--config", str(DEMO), *ov]) == 0
    emb, names, _, _ = load_set(load_config(DEMO, ov), "pool")
    assert emb.shape[0] == len(build_dataset(f"manifest:{manifest}")) == len(names)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
