"""The inverted-list self-join behind dedup, and the IVF sizing that keeps curation linear in the pool."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from testkit import unit

from dinolike.curation.config import load_config
from dinolike.curation.dedup import deduplicate
from dinolike.curation.index import _split_counts, build_index, ivf_nlist, make_quantizer, train_centroids
from dinolike.curation.selfjoin import threshold_join, top_k_per_row

pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # see conftest.py


def _pool(n: int, dim: int = 32, n_centres: int = 60, seed: int = 0) -> np.ndarray:
    """Clustered unit vectors whose within-cluster cosines straddle 0.6, plus 5 % near-copies at the end."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_centres, dim))
    base = unit(centres[rng.integers(0, n_centres, n)] + 0.8 * rng.normal(size=(n, dim)))
    src = rng.integers(0, n, n // 20)
    return np.concatenate([base, unit(base[src] + 0.05 * rng.normal(size=(len(src), dim)))])


def _brute_force_edges(x: np.ndarray, threshold: float, k: int) -> set[tuple[int, int]]:
    """Independent reference: each row's k most similar other rows above the threshold, both directions."""
    sims = x @ x.T  # [N, N]
    np.fill_diagonal(sims, -np.inf)
    edges = set()
    for i, row in enumerate(sims):
        above = np.flatnonzero(row > threshold)
        for j in above[np.argsort(-row[above], kind="stable")[:k]]:
            edges.add((min(i, int(j)), max(i, int(j))))
    return edges


def _cfg(**over: object) -> dict:
    index = dict(load_config(None).index)
    return {**index, "type": "ivf", **over}


def test_join_probing_every_list_is_the_exact_knn_threshold_graph() -> None:
    x = _pool(1500)
    nlist = 1500 * 21 // 20 // 50
    src, dst = threshold_join(x, 0.6, 3, _cfg(list_size=50, nprobe=nlist))  # k=3 caps the dense rows
    got = set(zip(src.tolist(), dst.tolist(), strict=True))
    assert (src < dst).all() and len(got) == len(src)  # each pair once, i < j
    want = _brute_force_edges(x, 0.6, 3)
    assert got == want
    degree = np.bincount(np.concatenate([src, dst]), minlength=len(x))
    assert degree.max() > 3  # the cap is per image's own list: edges from the other side still count


@pytest.mark.parametrize("quantizer", ["flat", "hnsw"])
def test_join_with_few_probes_keeps_near_all_edges(quantizer: str) -> None:
    x = _pool(6000)
    src, dst = threshold_join(x, 0.6, 64, _cfg(list_size=64, nprobe=6, quantizer=quantizer))
    want = _brute_force_edges(x, 0.6, 64)
    got = set(zip(src.tolist(), dst.tolist(), strict=True))
    assert got <= _brute_force_edges(x, 0.6, len(x))  # exact cosines: every edge is above the threshold
    assert len(got & want) >= 0.98 * len(want), len(got) / len(want)


def test_auto_quantizer_puts_every_vector_in_its_nearest_lists_at_a_10m_pools_list_count() -> None:
    """10M images at list_size 256 make ~39k lists. There `auto` must give each vector its exact nearest
    lists (adds use the first, searches all nprobe). The HNSW graph `auto` chose above 32,768 lists before
    fails this test (top-1 0.82, 55 % of the 16 nearest lists; BENCHMARKS 3b)."""
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((100_000, 384), dtype=np.float32))  # [C, D] the pool's synthetic centres
    lists = unit(centres[rng.integers(0, len(centres), (40_000, 3))].sum(1))  # [L, D] list centroids
    x = unit(centres[rng.integers(0, len(centres), 2000)] + rng.standard_normal((2000, 384), dtype=np.float32)
             / np.sqrt(384))  # [Q, D] pool rows, cosine ~0.7 to their centre  # fmt: skip
    _, got = make_quantizer(lists, {**_cfg(), "nprobe": 16}).search(x, 16)  # [Q, 16]
    want = np.argsort(-(x @ lists.T), axis=1)[:, :16]  # [Q, 16] exact
    top1 = float((got[:, 0] == want[:, 0]).mean())
    recall = np.mean([len(set(g) & set(w)) / 16 for g, w in zip(got.tolist(), want.tolist(), strict=True)])
    assert top1 == 1.0 and recall > 0.999, (top1, recall)


def test_top_k_per_row_keeps_the_most_similar() -> None:
    rng = np.random.default_rng(4)
    rows, cols, sims = rng.integers(0, 30, 2000), rng.integers(0, 500, 2000), rng.random(2000).astype(np.float32)
    keep = top_k_per_row(rows, cols, sims, 5)
    for r in range(30):
        mine = np.flatnonzero(rows == r)
        assert sorted(sims[keep][rows[keep] == r]) == sorted(np.sort(sims[mine])[::-1][:5].tolist())


def test_ivf_dedup_merges_injected_copies_like_flat() -> None:
    x = _pool(8000)
    n_copies = 8000 // 20
    dedup = {"k": 64, "threshold": 0.9, "ref_threshold": 0.9}
    exact = deduplicate(x, None, dedup, _cfg(type="flat"))
    ivf = deduplicate(x, None, dedup, _cfg(list_size=128))
    copies = np.arange(len(x) - n_copies, len(x))
    merged = (ivf.component[copies] != copies).mean()
    assert merged >= 0.99 and (exact.component[copies] != copies).mean() >= 0.99
    assert (ivf.component == exact.component).mean() >= 0.99


def test_ivf_sizing_scans_a_constant_number_of_vectors_per_query() -> None:
    cfg = _cfg()
    for n in (10**5, 10**6, 10**7):  # self-search: lists grow with N, each query scans nprobe lists
        nlist = ivf_nlist(n, n, cfg)
        assert abs(n / nlist - cfg["list_size"]) < 1 and nlist <= n
    few = [ivf_nlist(n, 10_000, cfg) for n in (10**6, 10**7)]  # fixed query set: nlist stops growing
    assert few[0] == few[1] < 10**6 // cfg["list_size"]
    with pytest.raises(ValueError, match="larger than the pool"):
        ivf_nlist(10, 10, {**cfg, "nlist": 11}, "pool")


def test_two_level_centroids_cover_the_data() -> None:
    x = _pool(12000)
    rng = np.random.default_rng(5)
    for nlist in (20, 300):  # one level, two levels
        cent = train_centroids(x, nlist, niter=8, seed=0)
        assert cent.shape == (nlist, x.shape[1])
        np.testing.assert_allclose(np.linalg.norm(cent, axis=1), 1.0, atol=1e-4)
        fit = (x @ cent.T).max(1).mean()  # mean cosine to the nearest centroid
        random = (x @ x[rng.choice(len(x), nlist, replace=False)].T).max(1).mean()
        assert fit > random + 0.02, (nlist, fit, random)


def test_build_index_sizes_ivf_for_its_query_count() -> None:
    x = _pool(20000)
    cfg = _cfg(list_size=100)
    self_index = build_index(x, cfg)
    seeds_index = build_index(x, cfg, n_queries=50)
    assert self_index.nlist == ivf_nlist(len(x), len(x), cfg) and seeds_index.nlist < self_index.nlist
    assert faiss.extract_index_ivf(seeds_index).nprobe == cfg["nprobe"]


def test_list_split_is_proportional_and_exact() -> None:
    rng = np.random.default_rng(6)
    for _ in range(300):
        sizes = rng.integers(1, 60, rng.integers(1, 40))
        if rng.random() < 0.3:  # one group holding most of the sample
            sizes[rng.integers(0, len(sizes))] += 2000
        total = int(rng.integers(len(sizes), sizes.sum() + 1))
        out = _split_counts(total, sizes)
        assert out.sum() == total and (out >= 1).all() and (out <= sizes).all()
        share = total * sizes / sizes.sum()
        if (share >= 1).all():  # no group lifted to its minimum of one: rounding moves each by less than 1
            assert np.abs(out - share).max() < 1
