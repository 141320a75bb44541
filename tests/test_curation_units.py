"""Building blocks of the curation pipeline, checked against independent computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as scipy_components
from testkit import unit

from dinolike.curation.config import ConfigError, load_config
from dinolike.curation.dedup import deduplicate
from dinolike.curation.embed_step import prepare_sets, submit_embed
from dinolike.curation.index import build_index, search
from dinolike.curation.sample import balanced_quota, balanced_sample
from dinolike.curation.store import ShardSet, StepOutputError
from dinolike.curation.unionfind import connected_components

DEMO = Path(__file__).resolve().parent.parent / "configs" / "curation" / "fmnist_demo.yaml"
INDEX = {"type": "flat", "flat_max_pairs": 0, "nlist": 0, "list_size": 256, "nprobe": 8, "quantizer": "auto",
         "train_per_list": 40, "train_iters": 10, "pq_m": 8, "pq_nbits": 8, "query_chunk": 97, "gpu": "auto"}


def test_union_find_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    n = 5000
    src, dst = rng.integers(0, n, 4000), rng.integers(0, n, 4000)
    labels = connected_components(n, src, dst)
    _, ref = scipy_components(coo_matrix((np.ones(len(src)), (src, dst)), shape=(n, n)), directed=False)
    # same partition: the map label -> scipy label is a bijection
    pairs = np.unique(np.stack([labels, ref]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
    assert (labels <= np.arange(n)).all() and (labels[labels] == labels).all()  # root = smallest member
    with pytest.raises(ValueError, match="endpoints"):
        connected_components(3, np.array([0]), np.array([3]))


def test_dedup_drops_whole_component_touching_a_reference() -> None:
    rng = np.random.default_rng(1)
    base = unit(rng.normal(size=(200, 64)))  # random unit vectors: pairwise cosine ~ +-0.3
    chain = unit(base[0] + 0.1 * np.cumsum(rng.normal(size=(3, 64)) * 0.1, axis=0))  # near-copies of row 0
    emb = np.concatenate([base, chain, unit(base[[5]] + 0.01)])  # rows 200-202: copies of 0; 203: copy of 5
    refs = unit(np.concatenate([chain[[2]] + 0.02, rng.normal(size=(10, 64))]))  # a reference copies row 202
    res = deduplicate(emb, refs, {"k": 8, "threshold": 0.6, "ref_threshold": 0.45}, INDEX)
    assert res.component[203] == 5 and res.keep[5] and not res.keep[203]  # copy of 5 removed, 5 kept
    assert res.leak[[0, 200, 201, 202]].all() and not res.keep[[0, 200, 201, 202]].any()  # whole group dropped
    assert res.keep.sum() == 200 - 1  # every other row survives
    assert res.summary()["duplicates_removed"] == 1 and res.summary()["leaks_removed"] == 4


@pytest.mark.parametrize("kind,min_recall", [("ivf", 0.9), ("ivfpq", 0.5)])
def test_approximate_index_recall_against_flat(kind: str, min_recall: float, one_faiss_thread: None) -> None:
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(50, 32))
    xb = unit(centers[rng.integers(0, 50, 6000)] + 0.5 * rng.normal(size=(6000, 32)))
    xq = xb[:300]
    exact = search(build_index(xb, INDEX), xq, 10, chunk=1000)[1]
    cfg = {**INDEX, "type": kind, "nlist": 64, "nprobe": 16, "train_per_list": 47}
    sims, ids = search(build_index(xb, cfg), xq, 10, chunk=37)  # chunked search covers every query
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, ids, strict=True)])
    assert recall >= min_recall, recall
    if kind == "ivf":  # IVF-Flat scores are exact inner products of the vectors it returns
        np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", xq, xb[ids]), atol=1e-5)


def test_balanced_quota_is_water_filling() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        cap = rng.integers(0, 40, rng.integers(1, 12))
        budget = int(rng.integers(0, cap.sum() + 20))
        q = balanced_quota(budget, cap)
        assert q.sum() == min(budget, cap.sum()) and (q <= cap).all()
        if q.sum():  # one water level L: every group gives min(cap, L) or min(cap, L + 1)
            level = min(int(q[q < cap].min()) if (q < cap).any() else int(cap.max()), int(q.max()))
            assert ((q == np.minimum(cap, level)) | (q == np.minimum(cap, level + 1))).all()


def test_balanced_sample_balances_top_level() -> None:
    # 3 top clusters over 6 leaf clusters; top 0 holds 900 images, tops 1 and 2 hold 60 and 40
    leaf_sizes = np.array([500, 400, 30, 30, 25, 15])
    leaf_of_image = np.repeat(np.arange(6), leaf_sizes)
    top_of_leaf = np.array([0, 0, 1, 1, 2, 2])
    ids, leaf = balanced_sample([leaf_of_image, top_of_leaf], target=300, seed=0)
    per_top = np.bincount(top_of_leaf[leaf], minlength=3)
    assert len(ids) == 300 and len(np.unique(ids)) == 300
    assert per_top.tolist() == [200, 60, 40]  # small tops give all they have, the rest goes to the big one
    assert np.bincount(leaf, minlength=6)[:2].tolist() == [100, 100]  # split evenly inside the big top


def test_strict_config_names_unknown_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dedup.treshold"):
        load_config(DEMO, ["dedup.treshold=0.5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("retrieve:\n  n_cluster: 10\n")
    with pytest.raises(ConfigError, match="retrieve.n_cluster"):
        load_config(bad)
    assert load_config(DEMO, ["dedup.k=8"]).dedup.k == 8


def test_shard_marker_guards(tmp_path: Path) -> None:
    shards = ShardSet(tmp_path)
    shards.write_shard(0, np.ones((2, 3), np.float32), ["a", "b"], [0, 1], [], "fp1")
    assert shards.is_complete(0, "fp1")
    with pytest.raises(StepOutputError, match="another embedder"):
        shards.is_complete(0, "fp2")
    np.save(shards.npy(0), np.ones((1, 3), np.float32))  # rows no longer match the marker: incomplete
    assert not shards.is_complete(0, "fp1")


def test_submit_embed_sends_only_pending_shards(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(5):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(pool / f"{i}.png")
    cfg = load_config(DEMO, [f"work_dir={tmp_path / 'w'}", f"pool=[folder-nolabels:{pool}]", "references=[]",
                             "seeds=[]", "embed.shard_size=2", "embed.progress=false"])

    class InlineExecutor:  # stands in for a submitit executor: runs the array's tasks right here
        def map_array(self, fn, *args):  # noqa: ANN001, ANN202
            return [fn(*a) for a in zip(*args, strict=True)]

    assert submit_embed(cfg, InlineExecutor()) == [True, True, True]
    assert submit_embed(cfg, InlineExecutor()) == []  # everything complete: nothing submitted
    assert prepare_sets(cfg) == {"pool": 3}


def test_embed_array_is_chunked_under_the_array_limit(tmp_path: Path) -> None:
    """7 pending shards under `embed.array_max=3`: 3 tasks of 3/2/2 shards, `array_parallel` passed on as
    the array's concurrency; each task reads its items by byte offset and the shards equal a local run."""
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(13):
        Image.fromarray(np.full((28, 28), 15 * i, np.uint8)).save(pool / f"{i:02d}.png")
    over = [f"pool=[folder-nolabels:{pool}]", "references=[]", "seeds=[]", "embed.shard_size=2",
            "embed.progress=false", "embed.array_max=3", "embed.array_parallel=2"]
    cfg = load_config(DEMO, [f"work_dir={tmp_path / 'w'}", *over])
    seen: dict = {}

    class InlineExecutor:
        def update_parameters(self, **kw):  # noqa: ANN003, ANN202
            seen.update(kw)

        def map_array(self, fn, *args):  # noqa: ANN001, ANN202
            seen["tasks"] = args[1]
            return [fn(*a) for a in zip(*args, strict=True)]

    assert submit_embed(cfg, InlineExecutor()) == [3, 2, 2]
    assert seen["slurm_array_parallelism"] == 2
    assert [[i for _, i in t] for t in seen["tasks"]] == [[0, 3, 6], [1, 4], [2, 5]]
    local = load_config(DEMO, [f"work_dir={tmp_path / 'local'}", *over])
    from dinolike.curation.embed_step import load_set, run_embed

    run_embed(local)
    a, b = load_set(cfg, "pool"), load_set(local, "pool")
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]


def test_finished_shards_are_hashed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A committed shard is stamped: later checks (every submission, every step) skip the SHA-256 until its
    files change; a changed file is hashed again and found damaged."""
    shards = ShardSet(tmp_path)
    shards.write_shard(0, np.ones((2, 3), np.float32), ["a", "b"], [0, 1], [], "fp1")
    hashed = []
    real = ShardSet.damage
    monkeypatch.setattr(ShardSet, "damage", lambda self, i, info: hashed.append(i) or real(self, i, info))
    assert shards.is_complete(0, "fp1") and shards.is_complete(0, "fp1")
    assert hashed == []  # stamped when written: never re-hashed
    data = bytearray(shards.npy(0).read_bytes())
    data[-1] ^= 1  # one flipped byte, same size
    shards.npy(0).write_bytes(bytes(data))
    assert not shards.is_complete(0, "fp1") and hashed == [0]
