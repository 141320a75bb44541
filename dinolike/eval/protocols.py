"""`python -m eval.knn` (also `dinolike eval knn`): the kNN protocol on a checkpoint's frozen features.

The protocol itself (`knn_eval`) is the library's, shared with training's periodic kNN.
"""

from __future__ import annotations

import argparse
import sys

from dinolike.eval.features import FeatureSet, check_knn_features
from dinolike.eval.knn import knn_eval


def build_parser() -> argparse.ArgumentParser:
    from .common import add_common_args

    p = argparse.ArgumentParser(
        prog="dinolike eval knn", description="Weighted kNN classification on frozen backbone features."
    )
    add_common_args(p)
    return p


def run(args: argparse.Namespace) -> dict:
    """Extract (or load cached) features and run the kNN protocol with the config's eval.knn settings."""
    from .common import EvalSetup

    setup = EvalSetup.from_args(args)
    kcfg = setup.cfg.eval.knn
    kind = check_knn_features(str(kcfg.features))  # before the extraction, which can take minutes
    train, test = (
        setup.features(args.train_dataset, args.limit_train),
        setup.features(args.val_dataset, args.limit_val),
    )
    t = setup.timer()
    dev = setup.device  # the GPU when there is one: the similarity matmul is the whole cost
    ks = tuple(int(k) for k in kcfg.ks)
    test_feats = test.knn_features(kind).to(dev)

    def fit(tr: FeatureSet) -> dict[str, float]:
        return knn_eval(
            tr.knn_features(kind).to(dev),
            tr.labels,
            test_feats,
            test.labels,
            ks=ks,
            temperature=float(kcfg.temperature),
            chunk=int(kcfg.chunk),
            num_classes=setup.num_classes(train, test),
        )

    metrics, few_rows, few = setup.over_label_splits(
        train, fit, lambda m: {f"k{k}_top1": m[f"k{k}_top1"] for k in ks})
    extra = {"temperature": float(kcfg.temperature), "features": kind, "protocol_seconds": t()}
    if few is not None:
        return setup.finish("knn", metrics, few_rows, extra={**extra, "few_label": few}, train=train, test=test)
    rows = [{"k": k, "top1": metrics[f"k{k}_top1"], "top5": metrics[f"k{k}_top5"]} for k in ks]
    return setup.finish("knn", metrics, rows, extra=extra, train=train, test=test)


def main(argv: list[str] | None = None) -> int:
    from .common import run_cli

    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
