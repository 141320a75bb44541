"""Linear probe and logistic regression on frozen features with a known linear ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinolike.eval.features import FeatureSet
from dinolike.eval.linear import head_kinds, linear_probe, pick_head, split_train_val, standardizer
from dinolike.eval.logreg import logreg_eval
from dinolike.eval.settings import eval_settings


def _linear(**changes: object) -> object:
    """The schema's linear-probe settings with `changes`; cpu_threads as the function default was (1)."""
    return eval_settings("linear", **changes)


def _separable(n: int, seed: int, n_classes: int = 5, dim: int = 16) -> FeatureSet:
    """Labels are the arg-max of a fixed linear map of the LAST block's CLS token; the earlier blocks
    and the pooled patch tokens are pure noise, so only heads that read the last block can succeed."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(dim, n_classes, generator=torch.Generator().manual_seed(123))
    cls = torch.randn(n, 4, dim, generator=g)  # [N, 4, D]
    labels = (cls[:, -1] @ w_true).argmax(dim=1)
    return FeatureSet(cls, torch.randn(n, dim, generator=g), labels)


def test_linear_probe_learns_separable_features_and_picks_best_lr() -> None:
    train, test = _separable(3000, 0), _separable(1000, 1)
    lrs = [1e-7, 1e-2, 1.0]
    res = linear_probe(train, test, _linear(lrs=lrs, epochs=8, batch_size=128, val_fraction=0.2), seed=0, device="cpu")
    assert res["test_top1"] > 90.0
    assert res["n_val"] == 600 and res["n_fit"] == 2400
    heads = res["heads"]
    assert len(heads) == len(lrs) * 4  # {1, 4 blocks} x {cls, cls+avgpool}
    # the reported best is the arg-max of the validation accuracies, and the tiny lr never learns
    assert res["val_top1"] == max(h["val_top1"] for h in heads)
    assert res["best_lr"] != 1e-7
    tiny = [h["val_top1"] for h in heads if h["lr"] == 1e-7]
    assert max(tiny) < 50.0
    good = [h for h in heads if h["lr"] == res["best_lr"] and h["n_last_blocks"] == 1 and not h["avgpool"]]
    assert good[0]["val_top1"] > 90.0


def test_linear_probe_is_deterministic_and_pixels_have_one_head_kind() -> None:
    train, test = _separable(600, 0), _separable(200, 1)
    pix_train = FeatureSet(train.cls[:, -1:], None, train.labels)
    pix_test = FeatureSet(test.cls[:, -1:], None, test.labels)
    assert [k.name for k in head_kinds(pix_train, [1, 4], [False, True])] == ["blocks1"]
    a = linear_probe(pix_train, pix_test, _linear(lrs=[0.1], epochs=2), seed=5, device="cpu")
    b = linear_probe(pix_train, pix_test, _linear(lrs=[0.1], epochs=2), seed=5, device="cpu")
    assert a["test_top1"] == b["test_top1"] and a["heads"] == b["heads"]


def test_validation_split_is_disjoint_and_seeded() -> None:
    fit, val = split_train_val(1000, 0.1, seed=3)
    assert len(val) == 100 and len(fit) == 900
    assert len(set(fit.tolist()) | set(val.tolist())) == 1000
    assert torch.equal(val, split_train_val(1000, 0.1, seed=3)[1])
    with pytest.raises(ValueError):
        split_train_val(10, 1.5, seed=0)


def test_logreg_separable_features_and_c_sweep() -> None:
    train, test = _separable(2000, 0), _separable(500, 1)
    res = logreg_eval(
        train.cls[:, -1].numpy(),
        train.labels.numpy(),
        test.cls[:, -1].numpy(),
        test.labels.numpy(),
        eval_settings("logreg", cs=[1e-5, 1.0, 100.0], backend="sklearn", max_iter=1000),
        seed=0,
    )
    assert res["test_top1"] > 90.0
    by_c = {r["C"]: r["val_top1"] for r in res["sweep"]}
    assert res["best_C"] == max(by_c, key=by_c.get)
    assert by_c[1e-5] < by_c[res["best_C"]]  # heavy regularisation underfits
    assert res["test_top5"] >= res["test_top1"]


def test_logreg_handles_labels_missing_from_train_classes() -> None:
    # test labels that never occur in train must count as errors, not crash or be mis-indexed
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = np.where(x[:, 0] > 0, 2, 5)  # sparse class ids
    res = logreg_eval(x, y, x[:50], np.full(50, 7), eval_settings("logreg", cs=[1.0], backend="sklearn", max_iter=1000),
                      seed=0)
    assert res["test_top1"] == 0.0


def _badly_scaled(n: int, seed: int) -> FeatureSet:
    """The label is the sign of a dimension 1000x smaller than the noise dimensions beside it."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.randn(n, 1, 8, generator=g) * 10.0  # [N, 1, D]
    labels = (cls[:, 0, 0] > 0).long()
    cls[:, 0, 0] *= 1e-4  # the informative dimension: scale 1e-3
    return FeatureSet(cls, None, labels)


def test_standardizing_lets_sgd_use_a_tiny_informative_dimension() -> None:
    train, test = _badly_scaled(2000, 0), _badly_scaled(500, 1)
    kw = {"lrs": [0.01], "epochs": 3, "batch_size": 64}
    plain = linear_probe(train, test, _linear(standardize=False, **kw), seed=0, device="cpu")
    scaled = linear_probe(train, test, _linear(standardize=True, **kw), seed=0, device="cpu")
    assert scaled["test_top1"] > 95.0
    assert plain["test_top1"] < 75.0  # the raw features' gradient on that dimension is ~1e-3 of the rest


def test_a_dimension_constant_in_the_fit_rows_is_left_unscaled() -> None:
    mu, sd = standardizer(torch.tensor([[1.0, 5.0], [3.0, 5.0]]))
    assert torch.equal(mu, torch.tensor([[2.0, 5.0]])) and torch.equal(sd, torch.tensor([[1.0, 1.0]]))
    # 1 shot of raw pixels: a border pixel is blank in every labelled image but not in the test images;
    # dividing by its ~0 spread would swamp every logit with that one pixel
    train, test = _separable(200, 0), _separable(300, 1)
    train.cls[:, :, 0] = 0.0
    test.cls[:, :, 0] = 50.0 * torch.sign(torch.randn(300, 4, generator=torch.Generator().manual_seed(2)))
    res = linear_probe(train, test, _linear(lrs=[0.1], epochs=10, batch_size=32), seed=0, device="cpu")
    assert res["test_top1"] > 50.0  # ~20 % when the border pixel is divided by its ~0 spread


def test_heads_tied_on_validation_accuracy_are_told_apart_by_their_cross_entropy() -> None:
    # well-separated clusters: several lrs reach 100 % on the hold-out; the first of them is the least trained
    def clusters(n: int, seed: int) -> FeatureSet:
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 4, (n,), generator=g)
        centres = 4.0 * torch.randn(4, 8, generator=torch.Generator().manual_seed(7))  # [4, D]
        return FeatureSet((centres[labels] + torch.randn(n, 8, generator=g))[:, None], None, labels)

    train, test = clusters(400, 0), clusters(500, 1)
    res = linear_probe(train, test, _linear(lrs=[1e-3, 1e-2, 0.1, 1.0], epochs=5, batch_size=64, val_fraction=0.1),
                       seed=0, device="cpu")
    top = max(h["val_top1"] for h in res["heads"])
    tied = [h for h in res["heads"] if h["val_top1"] == top]
    assert len(tied) > 1  # the situation the second key exists for
    assert res["best_head"] == min(tied, key=lambda h: h["val_loss"])["head"] != tied[0]["head"]
    assert all(h["val_loss"] > 0 for h in res["heads"])
    # accuracy still comes first: a lower loss never beats a higher validation accuracy
    heads = [{"head": "a", "val_top1": 90.0, "val_loss": 0.9}, {"head": "b", "val_top1": 80.0, "val_loss": 0.1},
             {"head": "c", "val_top1": 90.0, "val_loss": 0.5}]
    assert pick_head(heads)["head"] == "c"
