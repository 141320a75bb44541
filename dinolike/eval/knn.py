"""Weighted k-nearest-neighbour classification on frozen features (the DINO / DINOv2 kNN protocol).

Free of any model or dataset code: training's periodic kNN and the kNN protocol (`dinolike/eval/protocols.py`,
which adds checkpoints, datasets, the feature cache and result files) both call `knn_eval` with the
`eval.knn` settings of the eval schema (`KnnConfig`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dinolike.eval.settings import KnnConfig


def _merge_topk(best_sim: Tensor, best_idx: Tensor, sim: Tensor, offset: int, k: int) -> tuple[Tensor, Tensor]:
    """Fold one train chunk's similarities into the running top-k (keeps memory at chunk x chunk)."""
    kk = min(k, sim.shape[1])
    s, i = sim.topk(kk, dim=1)  # [T, kk]
    cat_s = torch.cat([best_sim, s], dim=1)  # [T, k + kk]
    cat_i = torch.cat([best_idx, i + offset], dim=1)
    top_s, pos = cat_s.topk(min(k, cat_s.shape[1]), dim=1)  # [T, k]
    return top_s, cat_i.gather(1, pos)


def _topk_cosine(train_n: Tensor, q_n: Tensor, k: int, train_chunk: int) -> tuple[Tensor, Tensor]:
    """Top-k of q_n @ train_n.T, scanning the train set in chunks (inputs already L2-normalised)."""
    best_s = q_n.new_empty((q_n.shape[0], 0))  # [T, 0]
    best_i = torch.empty((q_n.shape[0], 0), dtype=torch.long, device=q_n.device)
    for t0 in range(0, train_n.shape[0], train_chunk):
        sim = q_n @ train_n[t0 : t0 + train_chunk].T  # [T, Nc]
        best_s, best_i = _merge_topk(best_s, best_i, sim, t0, k)
    return best_s, best_i


def knn_neighbours(
    train_feats: Tensor, test_feats: Tensor, k: int, chunk: int = 1024, train_chunk: int = 65536
) -> tuple[Tensor, Tensor]:
    """Cosine top-k neighbours of every test row among the train rows.

    Both inputs are L2-normalised here, so the result does not depend on the caller's scaling.
    Returns (similarities [M, k] sorted descending, train indices [M, k]).
    """
    train = F.normalize(train_feats.float(), dim=1)  # [N, D]
    test = F.normalize(test_feats.float().to(train.device), dim=1)  # [M, D]
    k = min(k, train.shape[0])
    sims, idxs = [], []
    for start in range(0, test.shape[0], chunk):
        s, i = _topk_cosine(train, test[start : start + chunk], k, train_chunk)
        sims.append(s)
        idxs.append(i)
    return torch.cat(sims), torch.cat(idxs)


def knn_eval(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    settings: KnnConfig,
    *,
    num_classes: int | None = None,
    train_chunk: int = 65536,
) -> dict[str, float]:
    """Weighted-vote kNN accuracy (percent) for each k, as in DINO.

    For test feature q and its k nearest train features x_i (cosine similarity s_i = <q, x_i> after
    L2 normalisation), class c gets the score  sum_i exp(s_i / T) * [y_i == c];  the prediction is
    the arg-max (top-1) or the 5 best classes that received votes (top-5).
    Memory is bounded by chunk x train_chunk floats.

    Returns {"k10_top1": ..., "k10_top5": ..., ...} for every k in ks (k is capped at the train size).
    """
    ks, temperature, chunk = settings.ks, settings.temperature, settings.chunk
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"knn_eval expects 2-D features of equal width, got train {tuple(train_feats.shape)} "
            f"and test {tuple(test_feats.shape)}"
        )
    if train_feats.shape[0] != train_labels.shape[0] or test_feats.shape[0] != test_labels.shape[0]:
        raise ValueError("knn_eval: features and labels differ in length")
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise ValueError("knn_eval: empty train or test set")
    if not ks:
        raise ValueError("knn_eval: ks is empty")
    device = train_feats.device
    train_labels = train_labels.to(device=device, dtype=torch.long)
    test_labels = test_labels.to(device=device, dtype=torch.long)
    test_feats = test_feats.to(device)
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    max_k = min(max(ks), train_feats.shape[0])
    n_top5 = min(5, num_classes)
    train_n = F.normalize(train_feats.float(), dim=1)  # [N, D]
    test_n = F.normalize(test_feats.float(), dim=1)  # [M, D]
    correct1 = {k: 0 for k in ks}
    correct5 = {k: 0 for k in ks}
    for start in range(0, test_n.shape[0], chunk):
        q = test_n[start : start + chunk]  # [T, D]
        y = test_labels[start : start + chunk]  # [T]
        sim, idx = _topk_cosine(train_n, q, max_k, train_chunk)  # [T, K] each, sorted descending
        weights = (sim / temperature).exp()  # [T, K]
        neigh_labels = train_labels[idx]  # [T, K]
        for k in ks:
            kk = min(k, max_k)
            scores = weights.new_zeros((q.shape[0], num_classes))  # [T, C]
            scores.scatter_add_(1, neigh_labels[:, :kk], weights[:, :kk])
            top_s, pred = scores.topk(n_top5, dim=1)  # [T, 5]
            # a class without a single vote is not a prediction (with k < 5 the rest of the top-5
            # would otherwise be arbitrary zero-score classes that could "hit" by luck)
            hit = (pred == y.unsqueeze(1)) & (top_s > 0)  # [T, 5]
            correct1[k] += int(hit[:, 0].sum().item())
            correct5[k] += int(hit.any(dim=1).sum().item())
    n = test_feats.shape[0]
    out: dict[str, float] = {}
    for k in ks:
        out[f"k{k}_top1"] = 100.0 * correct1[k] / n
        out[f"k{k}_top5"] = 100.0 * correct5[k] / n
    return out
