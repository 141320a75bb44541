"""Sharded nearest-neighbour search over a memory-mapped pool: one index trained on a sample, filled part by
part, merged on disk, searched part by part.

The faiss recipe for pools that do not fit in RAM (faiss wiki, "indexing 1G vectors"):
1. train: an IVF-PQ index (coarse centroids by two-level k-means, PQ codebooks) on a random sample of the
   pool - `index.train_per_list` vectors per list, never the whole pool;
2. add: every part of the pool is encoded into its own copy of the trained index (a rank per part);
3. merge: the parts' inverted lists are concatenated into one on-disk file (`merged.ivfdata`), which
   every searching process memory-maps: a 10M x 384 pool is ~0.4 GB of codes instead of 15 GB of floats;
4. search: each rank searches its parts of the queries. PQ similarities are approximate, so candidates
   within `index.rerank_margin` of a threshold are re-scored exactly from the memory-mapped floats: the
   decision (copy or not) is always taken on exact cosines, PQ only chooses which pairs to look at.
Below `index.flat_max_pairs` (database x queries) the search is exact: the pool is streamed block by block
past the queries (`exact_knn`), which is also the reference the approximate settings are measured against.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .index import gpu_enabled, ivf_nlist, make_quantizer, train_centroids
from .parts import PartSet, Ranks
from .rows import ArrayRows
from .store import atomic_write, write_json

__all__ = ["search_kind", "exact_knn", "ShardedIndex", "rerank"]

log = logging.getLogger(__name__)


def search_kind(nb: int, nq: int, cfg: Mapping[str, Any]) -> str:
    """flat | ivf | ivfpq: `index.type`, or (auto) exact while nb * nq <= flat_max_pairs, IVF-PQ above."""
    kind = cfg["type"]
    if kind == "auto":
        return "flat" if nb * nq <= float(cfg["flat_max_pairs"]) else "ivfpq"
    return str(kind)


def _merge_topk(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k columns per row of (sims [q, c], ids [q, c]), most similar first."""
    if sims.shape[1] > k:
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        sims, ids = np.take_along_axis(sims, part, 1), np.take_along_axis(ids, part, 1)
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


def exact_knn(
    db: ArrayRows, xq: np.ndarray, k: int, block: int = 65536, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of `db` for each query: (cosines [q, k], row ids [q, k]; -1 where none).

    The database is read one block of rows at a time and each block searched with `faiss.knn`, which cuts
    the q x block products into small tiles and keeps only their top k: memory ~ block x D + q x k whatever
    q is (a [q, block] similarity matrix would be 6.5 GB at q = block = 20k). `allowed` [N] bool restricts
    the candidates (e.g. the deduplicated pool).
    """
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    q = len(xq)
    best_s = np.full((q, k), -np.inf, np.float32)
    best_i = np.full((q, k), -1, np.int64)
    for s, xb in db.slices(block):
        ids = np.arange(s, s + len(xb))  # [b] row ids of the block
        if allowed is not None:
            mask = allowed[s : s + len(xb)]
            xb, ids = xb[mask], ids[mask]
        kk = min(k, len(xb))
        if not kk or not q:
            continue
        sims, part = faiss.knn(xq, np.ascontiguousarray(xb), kk, metric=faiss.METRIC_INNER_PRODUCT)  # [q, kk]
        best_s, best_i = _merge_topk(np.concatenate([best_s, sims], 1), np.concatenate([best_i, ids[part]], 1), k)
    best_i[~np.isfinite(best_s)] = -1
    return best_s, best_i


def rerank(db: ArrayRows, xq: np.ndarray, qrow: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Exact cosines [E] of pairs (query qrow[e] of xq, database row cand[e]), reading only those rows."""
    if not len(cand):
        return np.zeros(0, np.float32)
    uniq, inv = np.unique(cand, return_inverse=True)
    xb = db.take(uniq)  # [U, D] one gather of the distinct candidates
    return np.einsum("ed,ed->e", xq[qrow], xb[inv]).astype(np.float32)


class ShardedIndex:
    """The approximate index of one pool under `root` (trained.index, part_XXXXX.index, merged.*)."""

    def __init__(self, root: str | Path, cfg: Mapping[str, Any], kind: str) -> None:
        self.root = Path(root)
        self.cfg, self.kind = cfg, kind
        self._index: faiss.Index | None = None

    @property
    def trained_path(self) -> Path:
        return self.root / "trained.index"

    @property
    def merged_path(self) -> Path:
        return self.root / "merged.index"

    def _write(self, index: faiss.Index, path: Path) -> None:
        atomic_write(path, lambda f: f.write(faiss.serialize_index(index).tobytes()), mode="wb")

    def train(self, db: ArrayRows, n_queries: int, seed: int) -> None:
        """Coarse centroids and PQ codebooks from a random sample of rows (read sorted: one pass on disk)."""
        if self.trained_path.is_file():
            return
        n, d = len(db), db.dim
        nlist = ivf_nlist(n, n_queries, self.cfg, "pool")
        pq_min = 39 * 2 ** int(self.cfg["pq_nbits"]) if self.kind == "ivfpq" else 0  # faiss: >= 39 per codeword
        n_train = min(n, max(nlist, int(self.cfg["train_per_list"]) * nlist, pq_min))
        rng = np.random.default_rng(seed)
        sample = db.take(np.sort(rng.choice(n, n_train, replace=False)))  # [n_train, D]
        quantizer = make_quantizer(train_centroids(sample, nlist, int(self.cfg["train_iters"]), seed,
                                                   self.cfg["gpu"]), self.cfg)
        if self.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            m = int(self.cfg["pq_m"])
            if d % m:
                raise ValueError(f"index.pq_m={m} must divide the embedding dim {d}")
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, int(self.cfg["pq_nbits"]), faiss.METRIC_INNER_PRODUCT)
        # the quantizer holds the centroids already: this trains only the PQ codebooks, on the residuals of the
        # rows given, so give it what faiss samples anyway (256 per codeword), not a second copy of the sample
        n_pq = min(len(sample), 256 * 2 ** int(self.cfg["pq_nbits"]))
        pq_rows = sample[np.sort(rng.choice(len(sample), n_pq, replace=False))]
        del sample
        index.train(pq_rows)
        quantizer.this.disown()  # owned by `index` from here on (serialised with it)
        index.own_fields = True
        log.info("index: %s, %d lists, trained on %d of %d rows", self.kind, nlist, n_train, n)
        self._write(index, self.trained_path)

    def add(self, db: ArrayRows, parts: PartSet, r: Ranks, chunk: int) -> None:
        """Encode this rank's parts of the pool, each into its own index file (the unit of resume)."""
        for p in parts.mine(r):
            index = faiss.read_index(str(self.trained_path))
            a, b = parts.bounds(p)
            for s in range(a, b, chunk):
                x = db.rows(s, min(b, s + chunk))
                index.add_with_ids(x, np.arange(s, s + len(x), dtype=np.int64))
            self._write(index, parts.file(p).with_suffix(".index"))
            parts.write(p, rows=np.asarray(parts.bounds(p), np.int64))

    def merge(self, parts: PartSet) -> None:
        """One on-disk inverted-list file from every part (rank 0), then the merged index written last."""
        from faiss.contrib.ondisk import merge_ondisk

        if self.merged_path.is_file():
            return
        index = faiss.read_index(str(self.trained_path))
        ivfdata = self.root / "merged.ivfdata"
        ivfdata.unlink(missing_ok=True)  # a merge killed midway leaves a partial file: start it again
        merge_ondisk(index, [str(parts.file(p).with_suffix(".index")) for p in range(parts.n_parts)], str(ivfdata))
        self._write(index, self.merged_path)
        write_json(self.root / "merged.json", {"ntotal": int(index.ntotal), "parts": parts.n_parts})
        for p in range(parts.n_parts):  # the codes live in merged.ivfdata now
            parts.file(p).with_suffix(".index").unlink(missing_ok=True)

    def open(self) -> faiss.Index:
        """The merged index with its inverted lists memory-mapped (each process pages in what it probes)."""
        if self._index is None:
            index = faiss.read_index(str(self.merged_path), faiss.IO_FLAG_ONDISK_SAME_DIR)
            faiss.extract_index_ivf(index).nprobe = int(self.cfg["nprobe"])
            if gpu_enabled(self.cfg["gpu"]):  # pragma: no cover - needs faiss-gpu; the lists then live on GPU
                co = faiss.GpuMultipleClonerOptions()
                co.shard = True
                index = faiss.index_cpu_to_all_gpus(index, co=co)
            self._index = index
        return self._index

    def search(self, xq: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Approximate (cosines [q, k], ids [q, k]); `allowed` [N] bool keeps only those database rows."""
        index = self.open()
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        if allowed is None:
            return index.search(xq, k)
        bits = np.packbits(allowed, bitorder="little")  # [ceil(N / 8)] uint8: 1.25 MB at 10M rows
        sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))
        params = faiss.SearchParametersIVF(sel=sel, nprobe=int(self.cfg["nprobe"]))
        out = index.search(xq, k, params=params)
        del sel, bits  # `sel` points into `bits`: both live until the search returned
        return out
