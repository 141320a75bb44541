"""Curation out of core: memory-mapped shards, sharded dedup/retrieve/sample, their resume and their ranks.

Synthetic embedded pools (clustered unit vectors, 5 % injected near-copies, curation/synth.py) written in the
work dir's shard format, so each test starts at the step after `embed`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from testkit import free_port

from dinolike.commands.curate import main
from dinolike.curation.config import load_config
from dinolike.curation.hkmeans import KMeansPlan, kmeans
from dinolike.curation.index import assign
from dinolike.curation.parts import Ranks
from dinolike.curation.rows import ArrayRows, open_view
from dinolike.curation.search import exact_knn
from dinolike.curation.split_kmeans import split_level
from dinolike.curation.steps import load_dedup, run_step
from dinolike.curation.store import ShardSet, StepOutputError
from dinolike.curation.synth import write_synthetic_set

ROOT = Path(__file__).resolve().parent.parent
N, DIM, SHARD = 6000, 32, 500
# small pool, small parts: 6 parts of 1000 rows, IVF-PQ forced (the default switches to it above 1e9 pairs)
OVERRIDES = ["embed.progress=false", "references=[]", "seeds=[]", "scale.part_rows=1000", "scale.chunk_rows=400",
             "dedup.threshold=0.9", "dedup.k=8", "index.pq_m=16", "index.pq_nbits=6", "index.list_size=100",
             "index.threads=1", "sample.levels=[60,6]", "sample.resample_steps=[2,2]", "sample.sample_size=[5,5]",
             "sample.kmeans_iters=5", "sample.target=600", "build.sources=[sample]"]


def _cfg(work: Path, *extra: str):  # noqa: ANN202
    return load_config(None, [f"work_dir={work}", f"pool=[folder-nolabels:{work}/nowhere]", *OVERRIDES, *extra])


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("scale")
    copies = write_synthetic_set(base / "proto" / "embeddings" / "pool", N, DIM, SHARD)
    return {"base": base, "copies": copies}


def _work(pool: dict, name: str) -> Path:
    """A fresh work dir holding a copy of the synthetic pool's shards."""
    import shutil

    work = pool["base"] / name
    shutil.copytree(pool["base"] / "proto", work)
    return work


def _edges(work: Path) -> set[tuple[int, int]]:
    """Self-dedup edges of a finished dedup run, from its part files."""
    fp = json.loads((work / "dedup" / "done.json").read_text())["fingerprint"]
    out = set()
    for f in sorted((work / "dedup" / "work" / fp / "parts").glob("part_*.npz")):
        with np.load(f) as z:
            out |= set(zip(z["src"].tolist(), z["dst"].tolist(), strict=True))
    return out


def test_exact_knn_streams_blocks_like_a_full_search() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((700, 16)).astype(np.float32)
    sims, ids = exact_knn(ArrayRows(x), x[:50], 5, block=64)  # 11 blocks
    full = x[:50] @ x.T
    np.testing.assert_array_equal(ids, np.argsort(-full, axis=1)[:, :5])
    np.testing.assert_allclose(sims, np.sort(full, axis=1)[:, ::-1][:, :5], rtol=1e-5)


def test_sharded_ivfpq_dedup_against_exact(pool: dict) -> None:
    """IVF-PQ dedup (index trained on a sample, 6 parts) finds the exact search's copy pairs; its decisions
    are exact cosines, so precision is 1 by construction, and recall is measured."""
    approx, exact = _work(pool, "approx"), _work(pool, "exact")
    s = run_step(_cfg(approx, "index.type=ivfpq"), "dedup")
    run_step(_cfg(exact, "index.type=flat"), "dedup")
    assert s["index"] == "ivfpq" and s["parts"] == 6
    got, ref = _edges(approx), _edges(exact)
    precision, recall = len(got & ref) / len(got), len(got & ref) / len(ref)
    assert precision == 1.0 and recall >= 0.99, (precision, recall)
    keep = load_dedup(_cfg(approx)).keep
    view = open_view(ShardSet(approx / "embeddings" / "pool"))
    copies = pool["copies"]
    cos = np.einsum("ij,ij->i", view.take(copies[:, 0]), view.take(copies[:, 1]))
    clear = copies[cos > 0.92]  # injected copies clearly above the threshold (the noise spreads them at D=32)
    assert len(clear) > 0.9 * len(copies)
    assert not (keep[clear[:, 0]] & keep[clear[:, 1]]).any()  # of each copy and its source, one is removed
    assert keep.sum() >= N - len(copies) - 30  # and few other images go


def test_missing_or_corrupt_shard_is_one_line(pool: dict, capsys: pytest.CaptureFixture[str]) -> None:
    work = _work(pool, "broken")
    argv = ["dedup", f"work_dir={work}", f"pool=[folder-nolabels:{work}]", *OVERRIDES]
    shards = ShardSet(work / "embeddings" / "pool")
    shards.npy(3).write_bytes(shards.npy(3).read_bytes()[:1000])  # truncated
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shard 3" in err and "damaged" in err, err
    shards.npy(3).unlink()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shard 3" in err and "missing" in err, err
    with pytest.raises(StepOutputError, match="shard 3"):
        open_view(shards)


def _two_ranks(cmd: list[str], timeout: int = 240, extra_path: Path | None = None) -> None:
    port = free_port()
    path = os.pathsep.join(str(p) for p in (ROOT, extra_path) if p)
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2",
                                                  "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                                                  "MASTER_PORT": str(port), "PYTHONPATH": path},
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]


KM = (40, 6, 2, 5, 700)  # k, Lloyd iterations, resampling steps, rows per cluster kept when resampling, chunk
RANK_SCRIPT = """
import sys
from pathlib import Path
import numpy as np
from test_curation_scale import KM, _cfg
from dinolike import dist
from dinolike.curation.hkmeans import KMeansPlan, kmeans
from dinolike.curation.parts import Ranks
from dinolike.curation.steps import run_step
from dinolike.curation.rows import open_view
from dinolike.curation.store import ShardSet
work = Path(sys.argv[1])
for step in ("dedup", "sample"):
    run_step(_cfg(work, "index.type=ivfpq"), step)
r = Ranks()
if r.main:
    (work / "sample" / "result.npz").rename(work / "sample_one_step.npz")
r.barrier()
run_step(_cfg(work, "index.type=ivfpq", "sample.level1_split=6"), "sample")
c = kmeans(open_view(ShardSet(work / "embeddings" / "pool")), KMeansPlan(*KM), 3, r)
if r.main:
    np.save(work / "kmeans.npy", c)
r.barrier()
dist.cleanup()  # what `dinolike curate` does on its way out (dinolike/cli.py)
"""


def test_two_ranks_equal_one_process(pool: dict) -> None:
    """The sharded steps (dedup, sample) and k-means under torch.distributed (gloo, 2 processes, each its
    half of the memory-mapped rows and of the parts) give the one-process results."""
    one, two = _work(pool, "one"), _work(pool, "two")
    for step in ("dedup", "sample"):
        run_step(_cfg(one, "index.type=ivfpq"), step)
    (one / "sample" / "result.npz").rename(one / "sample_one_step.npz")
    run_step(_cfg(one, "index.type=ivfpq", "sample.level1_split=6"), "sample")  # level 1 split: 10 x 6
    one_km = kmeans(open_view(ShardSet(one / "embeddings" / "pool")), KMeansPlan(*KM), 3, Ranks())
    script = two / "ranks.py"
    script.write_text(RANK_SCRIPT)
    _two_ranks([sys.executable, str(script), str(two)], extra_path=ROOT / "tests")
    np.testing.assert_allclose(np.load(two / "kmeans.npy"), one_km, atol=1e-5)  # all-reduced sums = one sum
    assert _edges(one) == _edges(two)
    for result in ("sample_one_step.npz", "sample/result.npz"):
        with np.load(one / result) as a, np.load(two / result) as b:
            np.testing.assert_array_equal(a["ids"], b["ids"])
            np.testing.assert_array_equal(a["pool_cluster"], b["pool_cluster"])
    summary = json.loads((two / "sample" / "done.json").read_text())["summary"]
    assert summary["ranks"] == 2 and summary["sampled"] == 600


def _step_cmd(work: Path, step: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dinolike.cli", "curate", step, f"work_dir={work}",
            f"pool=[folder-nolabels:{work}]", *OVERRIDES, *extra]


def test_killed_dedup_resumes_from_its_parts(pool: dict) -> None:
    """Kill the dedup step after its first part is committed; the rerun keeps the finished parts and ends
    with the clean run's result."""
    clean, crashed = _work(pool, "clean"), _work(pool, "crashed")
    slow = ("scale.part_rows=250",)  # 24 parts: time to kill between two of them
    run_step(_cfg(clean, "index.type=flat", *slow), "dedup")
    proc = subprocess.Popen(_step_cmd(crashed, "dedup", "index.type=flat", *slow), cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((crashed / "dedup").glob("work/*/parts/part_00000.done.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "dedup ended before its first part"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted((crashed / "dedup").glob("work/*/parts/part_*.done.json"))
    assert 1 <= len(done) < 24 and not (crashed / "dedup" / "done.json").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in done}
    run_step(_cfg(crashed, "index.type=flat", *slow), "dedup")
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # finished parts were not redone
    np.testing.assert_array_equal(load_dedup(_cfg(clean)).component, load_dedup(_cfg(crashed)).component)


def test_kmeans_resumes_from_its_checkpoint(pool: dict, tmp_path: Path) -> None:
    """A k-means killed after 3 of its 6 Lloyd iterations resumes from the checkpoint to the same centroids."""
    view = open_view(ShardSet(pool["base"] / "proto" / "embeddings" / "pool"))
    full = kmeans(view, KMeansPlan(*KM), 3, Ranks())
    ckpt = tmp_path / "level_1.npz"
    kmeans(view, KMeansPlan(40, 3, 0, 5, 700), 3, Ranks(), ckpt)  # the run that "died" after 3 iterations
    with np.load(ckpt) as z:
        assert int(z["step"]) == 3
    np.testing.assert_array_equal(kmeans(view, KMeansPlan(*KM), 3, Ranks(), ckpt), full)


def test_split_level_one_tightens_the_coarse_clusters_and_resumes(pool: dict, tmp_path: Path) -> None:
    """Level 1 in two steps (10 coarse clusters, each split into 6): every row lands on the nearest of its own
    coarse cluster's sub-centroids, the split clusters are tighter than the coarse ones, and a run that lost a
    block of splits (killed) redoes that block only, to the same result."""
    view = open_view(ShardSet(pool["base"] / "proto" / "embeddings" / "pool"))
    x = view.rows(0, len(view))  # [N, D]
    plan = KMeansPlan(60, 5, 0, 5, 700)
    level = split_level(view, plan, 6, 3, Ranks(), tmp_path / "split")
    cents = np.asarray(level.centroids)  # [K', D]
    label, sim = level.labels()
    assert 50 <= len(cents) <= 60 and set(np.unique(label)) == set(range(len(cents)))
    np.testing.assert_allclose(np.linalg.norm(cents, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose((x * cents[label]).sum(1), sim, atol=1e-5)
    with np.load(tmp_path / "split" / "coarse.npz") as z:
        coarse = z["centroids"]  # [10, D]
    coarse_label, coarse_sim = assign(x, coarse)
    for c in range(len(coarse)):  # the sub-centroids a row may take: those of its own coarse cluster
        rows = np.flatnonzero(coarse_label == c)
        own = np.unique(label[rows])
        best = (x[rows] @ cents[own].T).max(1)
        np.testing.assert_allclose(sim[rows], best, atol=1e-5)
        assert not np.isin(own, np.unique(label[coarse_label != c])).any()
    assert sim.mean() > coarse_sim.mean() + 0.05, (sim.mean(), coarse_sim.mean())
    (tmp_path / "split" / "split_000000.npz").unlink()  # the only block (64 coarse clusters each), lost
    (tmp_path / "split" / "centroids.npy").unlink()
    again = split_level(view, plan, 6, 3, Ranks(), tmp_path / "split")
    np.testing.assert_array_equal(np.asarray(again.centroids), cents)
    np.testing.assert_array_equal(again.labels()[0], label)
