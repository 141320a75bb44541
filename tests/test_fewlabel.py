"""Few-label splits: exact per-class counts, seeded and reproducible, and kNN behaving as expected on them."""

import pytest
import torch

from dinolike.data.datasets import FashionMNIST
from eval.fewlabel import FewLabelError, few_label_indices, mean_and_spread, per_class_counts, split_label
from eval.knn import knn_eval


@pytest.fixture(scope="module")
def fmnist_test_labels() -> torch.Tensor:
    return torch.as_tensor(FashionMNIST(split="test").labels).long()  # 1000 images of each of 10 classes


def test_shots_and_fractions_keep_exact_per_class_counts(fmnist_test_labels: torch.Tensor) -> None:
    y = fmnist_test_labels
    for shots in (1, 5, 10):
        idx = few_label_indices(y, seed=0, shots=shots)
        assert torch.bincount(y[idx], minlength=10).tolist() == [shots] * 10
        assert idx.unique().numel() == idx.numel()  # no image twice
    for frac, per_class in ((0.01, 10), (0.1, 100), (1.0, 1000)):
        idx = few_label_indices(y, seed=3, fraction=frac)
        assert torch.bincount(y[idx], minlength=10).tolist() == [per_class] * 10
    # an unbalanced set: each class keeps round(fraction * its size), at least one image
    uneven = torch.tensor([0] * 250 + [1] * 30 + [2] * 3)
    assert per_class_counts(uneven, fraction=0.1) == {0: 25, 1: 3, 2: 1}


def test_same_seed_same_split_other_seeds_differ(fmnist_test_labels: torch.Tensor) -> None:
    y = fmnist_test_labels
    a, b = few_label_indices(y, seed=1, shots=5), few_label_indices(y, seed=1, shots=5)
    assert torch.equal(a, b)
    others = [few_label_indices(y, seed=s, shots=5) for s in (2, 3, 4)]
    assert all(not torch.equal(a, o) for o in others)
    # a class's pick depends on (seed, class) only: dropping another class leaves it unchanged
    keep = y != 9
    sub = torch.nonzero(keep).flatten()
    picked_sub = sub[few_label_indices(y[keep], seed=1, shots=5)]
    assert set(picked_sub.tolist()) == set(a[y[a] != 9].tolist())


def test_bad_requests_are_clear_errors(fmnist_test_labels: torch.Tensor) -> None:
    with pytest.raises(FewLabelError, match="class 0 has only 1000"):
        few_label_indices(fmnist_test_labels, seed=0, shots=1001)
    with pytest.raises(FewLabelError, match="in \\(0, 1\\]"):
        few_label_indices(fmnist_test_labels, seed=0, fraction=1.5)
    with pytest.raises(FewLabelError, match="exactly one"):
        few_label_indices(fmnist_test_labels, seed=0, fraction=0.1, shots=2)
    assert [split_label(None, 5), split_label(0.01, None), split_label(None, None)] == ["5-shot", "1%", "100%"]
    assert mean_and_spread([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))


def test_knn_with_few_shots_on_clustered_features_gives_the_expected_accuracy() -> None:
    g = torch.Generator().manual_seed(0)
    n_classes, dim, per_class = 10, 32, 200
    centres = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0][:n_classes]  # orthonormal [10, 32]
    labels = torch.arange(n_classes).repeat_interleave(per_class)  # [2000]
    feats = centres[labels] + 0.05 * torch.randn(len(labels), dim, generator=g)
    test_labels = torch.arange(n_classes).repeat_interleave(50)
    test = centres[test_labels] + 0.05 * torch.randn(len(test_labels), dim, generator=g)
    # well separated: one labelled image per class is enough
    idx = few_label_indices(labels, seed=0, shots=1)
    assert knn_eval(feats[idx], labels[idx], test, test_labels, ks=(20,))["k20_top1"] == 100.0
    # classes 0 and 1 share a centre: with 5 shots each the vote between them is a coin toss per image,
    # the other 8 classes stay perfect -> 80 % + about half of the 10 % -> close to 90 %
    merged = labels.clone()
    feats2 = centres[torch.where(labels == 1, 0, labels)] + 0.05 * torch.randn(len(labels), dim, generator=g)
    test2 = centres[torch.where(test_labels == 1, 0, test_labels)] + 0.05 * torch.randn(len(test_labels), dim,
                                                                                     generator=g)
    idx = few_label_indices(merged, seed=0, shots=5)
    acc = knn_eval(feats2[idx], merged[idx], test2, test_labels, ks=(20,))["k20_top1"]
    assert 84.0 <= acc <= 96.0, acc
