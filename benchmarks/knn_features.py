"""Where a backbone's kNN accuracy comes from: which token, which block, which classes, against raw pixels.

  python benchmarks/knn_features.py runs/fmnist_cpu/teacher_backbone.pth

Full Fashion-MNIST sets, weighted kNN (k=20, T=0.07) as in eval.knn; features come from the eval cache.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dinolike.eval.common import EvalSetup, add_common_args  # noqa: E402

from dinolike.eval.features import FeatureSet  # noqa: E402
from dinolike.eval.knn import knn_neighbours  # noqa: E402

CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def features(pretrained: str) -> tuple[FeatureSet, FeatureSet]:
    p = argparse.ArgumentParser()
    add_common_args(p)
    args = p.parse_args(["--pretrained", pretrained, "--config", "configs/fmnist_cpu.yaml", "--no-progress",
                         "--output-dir", "/tmp/knn_features"] if pretrained == "pixels" else
                        ["--pretrained", pretrained, "--no-progress", "--output-dir", "/tmp/knn_features"])
    setup = EvalSetup.from_args(args)
    return setup.features("fmnist:train", None), setup.features("fmnist:test", None)


def predict(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Weighted-vote kNN predictions (k=20, T=0.07), the eval.knn rule."""
    sim, idx = knn_neighbours(train, test, 20)
    scores = torch.zeros(test.shape[0], len(CLASSES)).scatter_add_(1, train_labels[idx], (sim / 0.07).exp())
    return scores.argmax(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("pretrained")
    a = ap.parse_args()
    px_tr, px_te = features("pixels")
    tr, te = features(a.pretrained)
    y = te.labels

    def acc(pred: torch.Tensor) -> float:
        return 100.0 * (pred == y).float().mean().item()

    def both(s: FeatureSet) -> torch.Tensor:
        return torch.cat([F.normalize(s.knn_features(), dim=1), F.normalize(s.patch_mean, dim=1)], 1)

    rows = {"final CLS": (tr.knn_features(), te.knn_features()), "patch-token mean": (tr.patch_mean, te.patch_mean),
            "CLS + patch mean": (both(tr), both(te))}
    for b in range(tr.n_blocks - 1):
        rows[f"CLS of block -{tr.n_blocks - b}"] = (tr.cls[:, b], te.cls[:, b])
    print("| features | kNN k=20 |\n|---|---|")
    for name, (f_tr, f_te) in rows.items():
        print(f"| {name} | {acc(predict(f_tr.float(), tr.labels, f_te.float())):.2f} |")
    p_px = predict(px_tr.knn_features().float(), px_tr.labels, px_te.knn_features().float())
    p_ft = predict(tr.knn_features().float(), tr.labels, te.knn_features().float())
    print(f"\nraw pixels {acc(p_px):.2f}\n\n| class | pixels | features |\n|---|---|---|")
    for c, name in enumerate(CLASSES):
        m = y == c
        print(f"| {name} | {100 * (p_px[m] == c).float().mean():.1f} | {100 * (p_ft[m] == c).float().mean():.1f} |")
    only_px = ((p_px == y) & (p_ft != y)).float().mean().item() * 100
    only_ft = ((p_px != y) & (p_ft == y)).float().mean().item() * 100
    print(f"\nright only with pixels: {only_px:.2f} %, only with the features: {only_ft:.2f} %")


if __name__ == "__main__":
    main()
