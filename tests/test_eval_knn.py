"""kNN protocol: accuracy on clustered data, and equality with a brute-force reference implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinolike.eval.knn import knn_eval, knn_neighbours
from dinolike.eval.settings import eval_settings


def _clusters(n_per: int, n_classes: int, dim: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, dim, generator=g) * 3.0
    labels = torch.arange(n_classes).repeat_interleave(n_per)
    feats = centers[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_clustered_features_with_known_label_noise_give_expected_accuracy() -> None:
    # well separated clusters: every neighbour is from the right cluster, so top-1 equals exactly the
    # share of test points whose label was NOT flipped to a wrong class
    train_x, train_y = _clusters(100, 8, 32, noise=0.3, seed=0)
    test_x, test_y = _clusters(50, 8, 32, noise=0.3, seed=0)  # same centres (same seed), fresh noise
    test_x = test_x + 0.01 * torch.randn_like(test_x)
    flipped = torch.zeros(len(test_y), dtype=torch.bool)
    flipped[torch.randperm(len(test_y), generator=torch.Generator().manual_seed(1))[:100]] = True  # 25 %
    noisy_y = torch.where(flipped, (test_y + 3) % 8, test_y)
    res = knn_eval(train_x, train_y, test_x, noisy_y, eval_settings("knn", ks=(10, 20, 100), chunk=64),
                   train_chunk=300)
    expected = 100.0 * (1 - flipped.float().mean().item())
    for k in (10, 20, 100):
        assert res[f"k{k}_top1"] == pytest.approx(expected)
    clean = knn_eval(train_x, train_y, test_x, test_y, eval_settings("knn", ks=(10,)))
    assert clean["k10_top1"] == pytest.approx(100.0)


def _brute_force(train_x, train_y, test_x, test_y, k, temperature, num_classes):
    """Straightforward per-sample reference: sort all cosine similarities, weighted vote."""
    tr = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    te = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    top1 = top5 = 0
    for q, y in zip(te, test_y, strict=True):
        sims = tr @ q
        nn_idx = np.argsort(-sims)[:k]
        scores = np.zeros(num_classes)
        for i in nn_idx:
            scores[train_y[i]] += math.exp(sims[i] / temperature)
        order = np.argsort(-scores)
        top1 += int(order[0] == y)
        top5 += int(y in order[:5] and scores[y] > 0)  # unvoted classes are no prediction
    n = len(test_y)
    return 100.0 * top1 / n, 100.0 * top5 / n


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_weighting_and_temperature_match_brute_force(temperature: float) -> None:
    # overlapping classes, so the weighting actually decides many predictions
    rng = np.random.default_rng(3)
    c = 12
    centers = rng.normal(size=(c, 16))
    train_y = rng.integers(0, c, 400)
    test_y = rng.integers(0, c, 150)
    train_x = centers[train_y] + 1.5 * rng.normal(size=(400, 16))
    test_x = centers[test_y] + 1.5 * rng.normal(size=(150, 16))
    ks = (1, 7, 30, 500)  # 500 > train size: capped at 400
    res = knn_eval(
        torch.from_numpy(train_x).float(),
        torch.from_numpy(train_y),
        torch.from_numpy(test_x).float(),
        torch.from_numpy(test_y),
        eval_settings("knn", ks=ks, temperature=temperature, chunk=17),
        train_chunk=45,  # several train chunks: exercises the running top-k merge
        num_classes=c,
    )
    for k in ks:
        ref1, ref5 = _brute_force(train_x, train_y, test_x, test_y, min(k, 400), temperature, c)
        assert res[f"k{k}_top1"] == pytest.approx(ref1, abs=1e-9), k
        assert res[f"k{k}_top5"] == pytest.approx(ref5, abs=1e-9), k


def test_temperature_changes_the_vote() -> None:
    # one very close neighbour of class 0 against two farther ones of class 1: a sharp temperature lets
    # the close one win, a flat one lets the majority win
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.05]])
    sharp = knn_eval(train, labels, q, torch.tensor([0]), eval_settings("knn", ks=(3,), temperature=0.07))
    flat = knn_eval(train, labels, q, torch.tensor([0]), eval_settings("knn", ks=(3,), temperature=10.0))
    assert sharp["k3_top1"] == 100.0 and flat["k3_top1"] == 0.0


def test_neighbours_are_chunk_invariant() -> None:
    g = torch.Generator().manual_seed(0)
    tr, te = torch.randn(1000, 24, generator=g), torch.randn(90, 24, generator=g)
    s1, i1 = knn_neighbours(tr, te, 20, chunk=1000, train_chunk=10**6)
    s2, i2 = knn_neighbours(tr, te, 20, chunk=7, train_chunk=33)
    assert torch.equal(i1, i2) and torch.allclose(s1, s2)
    ref = torch.nn.functional.normalize(te, dim=1) @ torch.nn.functional.normalize(tr, dim=1).T
    assert torch.equal(i1, ref.topk(20, dim=1).indices)


def test_bad_inputs_raise_clear_errors() -> None:
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="equal width"):
        knn_eval(x, y, torch.randn(5, 3), y[:5], eval_settings("knn"))
    with pytest.raises(ValueError, match="differ in length"):
        knn_eval(x, y[:9], x, y, eval_settings("knn"))
