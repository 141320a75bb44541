"""Few-label splits: exact per-class counts, seeded and reproducible, and kNN behaving as expected on them."""

import pytest
import torch

from dinolike.data.datasets import FashionMNIST
from dinolike.eval.features import FeatureSet
from dinolike.eval.fewlabel import FewLabelError, few_label_indices, mean_and_spread, per_class_counts, split_label
from dinolike.eval.knn import knn_eval
from dinolike.eval.settings import eval_settings


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
    assert knn_eval(feats[idx], labels[idx], test, test_labels, eval_settings("knn", ks=(20,)))["k20_top1"] == 100.0
    # classes 0 and 1 share a centre: with 5 shots each the vote between them is a coin toss per image,
    # the other 8 classes stay perfect -> 80 % + about half of the 10 % -> close to 90 %
    merged = labels.clone()
    feats2 = centres[torch.where(labels == 1, 0, labels)] + 0.05 * torch.randn(len(labels), dim, generator=g)
    test2 = centres[torch.where(test_labels == 1, 0, test_labels)] + 0.05 * torch.randn(len(test_labels), dim,
                                                                                     generator=g)
    idx = few_label_indices(merged, seed=0, shots=5)
    acc = knn_eval(feats2[idx], merged[idx], test2, test_labels, eval_settings("knn", ks=(20,)))["k20_top1"]
    assert 84.0 <= acc <= 96.0, acc


def test_stratified_holdout_keeps_every_class_in_the_fit_part() -> None:
    from dinolike.eval.linear import split_train_val

    labels = torch.arange(10).repeat_interleave(5)  # 5 shots of 10 classes
    fit, val = split_train_val(len(labels), 0.1, seed=0, labels=labels)
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(50))
    assert torch.bincount(labels[val], minlength=10).tolist() == [1] * 10  # max(1, round(0.5)) per class
    assert torch.bincount(labels[fit], minlength=10).tolist() == [4] * 10
    fit1, val1 = split_train_val(10, 0.1, seed=0, labels=torch.arange(10))  # 1 shot: nothing to hold out
    assert len(val1) == 0 and sorted(fit1.tolist()) == list(range(10))


def test_a_holdout_too_small_to_choose_on_is_folded_back_into_the_fit_part() -> None:
    from dinolike.eval.linear import split_train_val

    labels = torch.arange(10).repeat_interleave(10)  # 10 shots: 1 image per class would be held out
    fit, val = split_train_val(len(labels), 0.1, seed=0, labels=labels, min_val_per_class=5)
    assert len(val) == 0 and sorted(fit.tolist()) == list(range(100))
    labels = torch.arange(10).repeat_interleave(60)  # 1 % of Fashion-MNIST: 6 per class, enough
    fit, val = split_train_val(len(labels), 0.1, seed=0, labels=labels, min_val_per_class=5)
    assert torch.bincount(labels[val], minlength=10).tolist() == [6] * 10 and len(fit) == 540
    # the unstratified split of a full train set is unaffected by the per-class minimum
    assert len(split_train_val(1000, 0.1, seed=0, min_val_per_class=5)[1]) == 100


def _fmnist_pixels(split: str) -> FeatureSet:
    ds = FashionMNIST(split=split)
    x = torch.tensor(ds.images, dtype=torch.float32).flatten(1) / 255.0  # [N, 784]
    return FeatureSet(x[:, None], None, torch.as_tensor(ds.labels).long())


def test_few_shot_linear_probe_on_fashion_mnist_pixels_does_not_pick_a_head_by_coin_toss() -> None:
    """At 5 shots a 10 % hold-out is one image per class: choosing among 13 lrs on it picked lr 1e-5 on
    split 1 (47.5 % test top-1 against 62-64 % for splits 0 and 2). Without a usable hold-out every shot
    fits and the grid's default head is used, so no split falls that far behind the others."""
    from dinolike.eval.linear import linear_probe
    from dinolike.eval.logreg import logreg_eval

    train, test = _fmnist_pixels("train"), _fmnist_pixels("test")
    lrs = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1]
    scores = []
    for seed in range(3):
        idx = few_label_indices(train.labels, seed, shots=5)
        res = linear_probe(train.subset(idx), test, eval_settings("linear", lrs=lrs, epochs=30, min_steps=1000),
                           seed=0, device="cpu", stratify=True)
        assert res["n_val"] == 0 and res["n_fit"] == 50 and res["best_lr"] == 1e-3, res["best_head"]
        scores.append(res["test_top1"])
    assert min(scores) > 57.0 and max(scores) - min(scores) < 6.0, scores  # raw-pixel kNN at 5 shots: ~57 %
    idx = few_label_indices(train.labels, 1, shots=5)
    lr = logreg_eval(train.cls[idx, 0].numpy(), train.labels[idx].numpy(), test.cls[:2000, 0].numpy(),
                     test.labels[:2000].numpy(),
                     eval_settings("logreg", cs=[0.01, 0.1, 1.0], backend="sklearn", max_iter=1000), seed=0,
                     stratify=True)
    assert lr["sweep"] == [] and lr["best_C"] == 0.1 and lr["test_top1"] > 55.0


def _eval(protocol: str, tmp_path, *flags: str) -> dict:
    from dinolike.commands.eval import main as eval_main

    out = tmp_path / f"{protocol}{'_'.join(flags)}"
    args = [protocol, "--pretrained", "pixels", "--limit-train", "3000", "--limit-val", "500", "--no-progress",
            "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), *flags]
    assert eval_main(args) == 0
    import json

    return json.loads((out / "results.json").read_text())


def test_few_label_flags_of_the_eval_commands_on_fashion_mnist(tmp_path) -> None:
    full = _eval("knn", tmp_path, "eval.knn.ks=[20]")
    few = _eval("knn", tmp_path, "--shots", "5", "--label-seeds", "3", "eval.knn.ks=[20]")
    info = few["few_label"]
    assert info["split"] == "5-shot" and info["seeds"] == [0, 1, 2]
    per_seed = [r["k20_top1"] for r in info["per_seed"]]
    assert all(r["n_labelled"] == 50 for r in info["per_seed"]) and len(set(per_seed)) > 1  # seeds differ
    assert few["n_train"] == 3000 and few["n_labelled"] == 50 and "n_labelled" not in full
    mean, sd = mean_and_spread(per_seed)
    assert few["metrics"]["k20_top1"] == pytest.approx(mean) and few["metrics"]["k20_top1_sd"] == pytest.approx(sd)
    # 50 labels instead of 3000: raw-pixel kNN loses a lot, but stays far above chance (10 %)
    assert 35.0 < mean < full["metrics"]["k20_top1"] - 5.0
    frac = _eval("knn", tmp_path, "--train-fraction", "0.1", "--label-seeds", "2", "eval.knn.ks=[20]")
    assert frac["few_label"]["split"] == "10%"
    assert sum(r["n_labelled"] for r in frac["few_label"]["per_seed"]) == pytest.approx(2 * 300, abs=2 * 10)
    # 1 shot: the probes have nothing to hold out and use their grid's default, and still learn
    for protocol in ("linear", "logreg"):
        one = _eval(protocol, tmp_path, "--shots", "1", "--label-seeds", "2", "eval.linear.lrs=[0.01,0.1,1.0]",
                    "eval.logreg.cs=[0.1,1.0,10.0]")
        assert one["few_label"]["per_seed"][0]["n_labelled"] == 10
        assert 20.0 < one["metrics"]["test_top1"] < 80.0, (protocol, one["metrics"])


def test_bad_few_label_flags_are_one_line_errors(tmp_path, capsys) -> None:
    from dinolike.commands.eval import main as eval_main

    base = ["knn", "--pretrained", "pixels", "--limit-train", "200", "--limit-val", "50", "--no-progress",
            "--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "cache")]
    for flags, message in ((["--shots", "5", "--train-fraction", "0.1"], "not both"),
                           (["--train-fraction", "1.5"], "--train-fraction must be in (0, 1]"),
                           (["--shots", "0"], "--shots must be >= 1"),
                           (["--shots", "500"], "has only")):
        assert eval_main([*base, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o" / "results.json").exists()
