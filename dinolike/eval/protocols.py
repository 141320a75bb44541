"""The eval jobs: kNN, linear probe and logistic regression of a backbone's frozen features.

Each takes the merged config of one job (`dinolike.eval.config.job_config`: the eval schema <- the run's
config <- overrides <- the job keys) and returns the results.json payload. The command `dinolike eval`,
the pipeline's eval stage and the final kNN of a training run all call these, in-process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from dinolike.eval.features import FeatureSet, check_knn_features
from dinolike.eval.knn import knn_eval
from dinolike.eval.linear import linear_probe, pick_head
from dinolike.eval.logreg import logreg_eval, logreg_features
from dinolike.eval.results import probe_headline
from dinolike.eval.settings import KnnConfig, LinearConfig, LogregConfig
from dinolike.eval.setup import EvalSetup


def eval_knn(cfg: DictConfig) -> dict[str, Any]:
    """Weighted kNN (`eval.knn`) of the job's backbone: train set as the bank, scored on the eval set."""
    settings = KnnConfig.of(cfg.eval.knn)
    kind = check_knn_features(settings.features)  # before the extraction, which can take minutes
    setup = EvalSetup.of(cfg)
    train, test = setup.labelled_sets()
    t = setup.timer()
    dev = setup.device  # the GPU when there is one: the similarity matmul is the whole cost
    test_feats = test.knn_features(kind).to(dev)

    def fit(tr: FeatureSet) -> dict[str, float]:
        return knn_eval(tr.knn_features(kind).to(dev), tr.labels, test_feats, test.labels, settings,
                        num_classes=setup.num_classes(train, test))

    ks = settings.ks
    metrics, few_rows, few = setup.over_label_splits(
        train, fit, lambda m: {f"k{k}_top1": m[f"k{k}_top1"] for k in ks})
    extra = {"temperature": settings.temperature, "features": kind, "protocol_seconds": t()}
    if few is not None:
        return setup.finish("knn", metrics, few_rows, extra={**extra, "few_label": few}, train=train, test=test)
    rows = [{"k": k, "top1": metrics[f"k{k}_top1"], "top5": metrics[f"k{k}_top5"]} for k in ks]
    return setup.finish("knn", metrics, rows, extra=extra, train=train, test=test)


def eval_linear(cfg: DictConfig) -> dict[str, Any]:
    """The DINOv2 linear-probe grid (`eval.linear`); the head is chosen on a hold-out of the train set."""
    settings = LinearConfig.of(cfg.eval.linear)
    setup = EvalSetup.of(cfg)
    train, test = setup.labelled_sets()
    t = setup.timer()

    def fit(tr: FeatureSet) -> dict[str, Any]:
        return linear_probe(tr, test, settings, seed=int(cfg.eval.seed), device=setup.device,
                            stratify=setup.few_label, num_classes=setup.num_classes(train, test))

    res, few_rows, few = setup.over_label_splits(train, fit, probe_headline)
    if few is not None:
        return setup.finish("linear", res, few_rows, extra={"few_label": few, "protocol_seconds": t()},
                            train=train, test=test)
    heads = res.pop("heads")
    rows = []  # one table row per input kind: its best learning rate on the validation split
    for kind in sorted({(h["n_last_blocks"], h["avgpool"]) for h in heads}):
        b = pick_head([h for h in heads if (h["n_last_blocks"], h["avgpool"]) == kind])
        chosen = b["head"] == res["best_head"]
        rows.append({"blocks": kind[0], "avgpool": kind[1], "best lr": b["lr"], "val top1": b["val_top1"],
                     "test top1": res["test_top1"] if chosen else "",
                     "test top5": res["test_top5"] if chosen else ""})
    return setup.finish("linear", res, rows, extra={"heads": heads, "protocol_seconds": t()}, train=train, test=test)


def eval_logreg(cfg: DictConfig) -> dict[str, Any]:
    """L2 logistic regression sweeping C (`eval.logreg`) on the final normalised CLS token."""
    settings = LogregConfig.of(cfg.eval.logreg)
    setup = EvalSetup.of(cfg)
    train, test = setup.labelled_sets()
    t = setup.timer()
    test_x, test_y = logreg_features(test), test.labels.numpy()

    def fit(tr: FeatureSet) -> dict[str, Any]:
        return logreg_eval(logreg_features(tr), tr.labels.numpy(), test_x, test_y, settings,
                           seed=int(cfg.eval.seed), stratify=setup.few_label)

    res, few_rows, few = setup.over_label_splits(train, fit, probe_headline)
    if few is not None:
        return setup.finish("logreg", res, few_rows, extra={"few_label": few, "protocol_seconds": t()},
                            train=train, test=test)
    sweep = res.pop("sweep")
    rows = [{"C": r["C"], "val top1": r["val_top1"],
             "test top1": res["test_top1"] if r["C"] == res["best_C"] else "",
             "test top5": res["test_top5"] if r["C"] == res["best_C"] else "",
             "iters": r["n_iter"], "fit s": r["seconds"]} for r in sweep]
    return setup.finish("logreg", res, rows, extra={"sweep": sweep, "protocol_seconds": t()}, train=train, test=test)


PROTOCOLS: dict[str, Callable[[DictConfig], dict[str, Any]]] = {
    "knn": eval_knn, "linear": eval_linear, "logreg": eval_logreg,
}
