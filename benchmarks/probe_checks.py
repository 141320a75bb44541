"""Is the linear probe the limit? Variants of `eval linear` on one backbone's Fashion-MNIST features.

  python benchmarks/probe_checks.py runs/fmnist_cpu_long/teacher_backbone.pth

Rows (each the full 60k / 10k, the same hold-out rule and head grid as `dinolike eval linear`):
- the shipped protocol (configs/eval/base.yaml: 13 lrs up to 0.1, 30 epochs, standardised features);
- + horizontally flipped copies of the train images as extra fit rows (DINOv2's linear eval trains on
  augmented images; a flip is the augmentation that keeps a 28 px garment whole). The hold-out is drawn
  from the doubled rows, so a held-out image's mirror can be a fit row: that flatters its val column only;
- the lr grid extended upwards (0.05 ... 2.0), at 30 and at 60 epochs: the shipped grid's best head sat
  at its largest lr (0.1) on the 11-epoch runs, so a grid too low would be the first suspect.
Printed as a markdown table (BENCHMARKS.md section 1c).
"""

from __future__ import annotations

import argparse
import time

import torch
from omegaconf import OmegaConf

from dinolike.data.datasets import build_dataset
from dinolike.data.normalize import build_eval_transform
from dinolike.eval.features import FeatureSet, extract_features
from dinolike.eval.linear import linear_probe
from dinolike.eval.settings import eval_settings
from dinolike.interop import load_pretrained

MEAN, STD = (0.286,), (0.353,)  # Fashion-MNIST, as configs/fmnist_cpu.yaml
HIGH_LRS = [0.05, 0.1, 0.2, 0.5, 1.0, 2.0]


def features(model: torch.nn.Module, spec: str, flip: bool) -> FeatureSet:
    """Features of the 28 px images of `spec`, mirrored left-right when `flip`."""
    base = build_eval_transform(28, 28, MEAN, STD)

    def mirrored(img) -> torch.Tensor:
        return torch.flip(base(img), dims=[-1])  # [1, 28, 28]

    return extract_features(model, build_dataset(spec, channels=1), mirrored if flip else base, channels=1,
                            mean=MEAN, std=STD, resolution=28, resize=28, n_last_blocks=4, batch_size=256,
                            num_workers=0, progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backbone", help="a teacher_backbone.pth of a Fashion-MNIST run")
    args = p.parse_args()
    model, _ = load_pretrained(args.backbone, model_cfg=None, which="teacher")
    model.eval()
    train, test = features(model, "fmnist:train", False), features(model, "fmnist:test", False)
    flipped = features(model, "fmnist:train", True)
    both = FeatureSet(torch.cat([train.cls, flipped.cls]),  # [2N, L, D]
                      torch.cat([train.patch_mean, flipped.patch_mean]), torch.cat([train.labels, train.labels]))
    shipped = OmegaConf.load("configs/eval/base.yaml").eval.linear
    base = {"lrs": list(shipped.lrs), "epochs": int(shipped.epochs), "standardize": bool(shipped.standardize)}
    variants = [
        ("shipped protocol", train, base),
        ("+ flipped train images", both, base),
        ("lr grid 0.05-2.0, 30 epochs", train, {**base, "lrs": HIGH_LRS}),
        ("lr grid 0.05-2.0, 60 epochs", train, {**base, "lrs": HIGH_LRS, "epochs": 60}),
    ]
    print(f"{args.backbone}\n\n| probe | head chosen (val) | val top-1 | test top-1 | seconds |\n|---|---|---|---|---|")
    for name, fit_set, kw in variants:
        t = time.perf_counter()
        r = linear_probe(fit_set, test, eval_settings("linear", **kw), seed=0, device="cpu", num_classes=10)
        print(f"| {name} | {r['best_head']} | {r['val_top1']:.2f} | {r['test_top1']:.2f} | "
              f"{time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
