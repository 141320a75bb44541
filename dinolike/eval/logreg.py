"""Logistic regression on frozen features (DINOv2's logreg protocol): sweep C, refit, test.

C is chosen on a validation split held out from train, then the model is refit on all of train with
that C and measured once on the test set. scikit-learn (L-BFGS) on CPU; cuML when it is installed and
a GPU is present, as the issue asks, since it is much faster for large feature sets.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dinolike.eval.features import FeatureSet
from dinolike.eval.settings import LogregConfig

from .linear import pick_head, split_train_val, standardizer

log = logging.getLogger(__name__)


def _cuml_available() -> bool:
    try:
        import cuml.linear_model  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _make_model(backend: str, c: float, max_iter: int, warm: bool) -> Any:
    if backend == "cuml":
        from cuml.linear_model import LogisticRegression as CuLR

        return CuLR(C=c, max_iter=max_iter, penalty="l2")
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=max_iter, tol=1e-4, warm_start=warm)


def _accuracies(proba: np.ndarray, classes: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Top-1 / top-5 percent from class probabilities [N, C] (classes = the model's column labels)."""
    k = min(5, proba.shape[1])
    top = classes[np.argsort(-proba, axis=1)[:, :k]]  # [N, k]
    hit = top == y[:, None]
    return 100.0 * float(hit[:, 0].mean()), 100.0 * float(hit.any(axis=1).mean())


def _mean_nll(proba: np.ndarray, classes: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of the true labels; a label the model never saw (absent from fit) counts as p = 1e-12."""
    if not len(y):
        return float("nan")
    pos = np.clip(np.searchsorted(classes, y), 0, len(classes) - 1)  # classes_ are sorted (scikit-learn, cuML)
    p = np.where(classes[pos] == y, proba[np.arange(len(y)), pos], 0.0)  # [N]
    return float(-np.log(np.clip(p, 1e-12, 1.0)).mean())


def logreg_eval(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    settings: LogregConfig,
    *,
    seed: int,
    stratify: bool = False,
) -> dict[str, Any]:
    """Multinomial L2 logistic regression: minimise  sum_i -log softmax(W x_i + b)_{y_i} + ||W||^2 / (2C).

    Returns test top-1/top-5 (percent) with the C chosen on the held-out validation split, and the
    validation accuracy of every C. Features are standardised with train statistics (L-BFGS converges
    much faster on unit-scale inputs; pixels and ViT tokens have very different scales).
    blas_threads caps the BLAS thread pool during the fits: each L-BFGS step is a small matmul, and on
    a busy machine a multi-threaded BLAS spin-waits and runs ~10x slower than a single thread.
    A few-label split holds out a class-stratified part (`stratify`); with nothing to hold out (1 shot,
    or under `min_val_per_class` images of a class: see split_train_val) the grid's middle C is used
    without a sweep.
    """
    from threadpoolctl import threadpool_limits

    st = settings
    with threadpool_limits(limits=st.blas_threads, user_api="blas"):
        return _logreg_eval(
            train_x,
            train_y,
            test_x,
            test_y,
            cs=st.cs,
            max_iter=st.max_iter,
            val_fraction=st.val_fraction,
            seed=seed,
            standardize=st.standardize,
            backend=st.backend,
            stratify=stratify,
            min_val_per_class=st.min_val_per_class,
        )


def _logreg_eval(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    cs: Sequence[float],
    max_iter: int,
    val_fraction: float,
    seed: int,
    standardize: bool,
    backend: str,
    stratify: bool,
    min_val_per_class: int,
) -> dict[str, Any]:
    if backend == "auto":
        backend = "cuml" if _cuml_available() else "sklearn"
    if backend not in ("sklearn", "cuml"):
        raise ValueError(f"unknown logreg backend {backend!r} (sklearn | cuml | auto)")
    if not cs:
        raise ValueError("logreg: the C grid is empty")
    train_x = np.asarray(train_x, dtype=np.float32)
    test_x = np.asarray(test_x, dtype=np.float32)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    labels = torch.from_numpy(train_y).long() if stratify else None
    fit_idx, val_idx = (i.numpy() for i in split_train_val(len(train_x), val_fraction, seed, labels, min_val_per_class))

    def scale(fit_rows: np.ndarray, *xs: np.ndarray) -> list[np.ndarray]:
        if not standardize:
            return list(xs)
        mu, sd = (t.numpy() for t in standardizer(torch.from_numpy(fit_rows)))  # the linear probe's rule
        return [(x - mu) / sd for x in xs]

    xf, xv = scale(train_x[fit_idx], train_x[fit_idx], train_x[val_idx])
    sweep = []
    model = None
    # ascending C with warm starts: each fit begins at the previous (more regularised) solution
    for c in sorted(float(c) for c in cs) if len(val_idx) else []:
        if model is None or backend == "cuml":
            model = _make_model(backend, c, max_iter, warm=True)
        else:
            model.set_params(C=c)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning at tiny C is expected and harmless
            model.fit(xf, train_y[fit_idx])
        proba, classes = np.asarray(model.predict_proba(xv)), np.asarray(model.classes_)  # [N_val, C], [C]
        v1, _ = _accuracies(proba, classes, train_y[val_idx])
        n_iter = int(np.max(getattr(model, "n_iter_", [-1])))
        sweep.append({"C": c, "val_top1": v1, "val_loss": _mean_nll(proba, classes, train_y[val_idx]),
                      "n_iter": n_iter, "seconds": time.perf_counter() - t0})
    if sweep:
        best = pick_head(sweep)  # the linear probe's rule: top-1, ties to the lowest cross-entropy
    else:  # nothing held out to choose on
        best = {"C": sorted(float(c) for c in cs)[len(cs) // 2], "val_top1": float("nan")}
    xa, xt = scale(train_x, train_x, test_x)
    final = _make_model(backend, best["C"], max_iter, warm=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final.fit(xa, train_y)
    t1, t5 = _accuracies(np.asarray(final.predict_proba(xt)), np.asarray(final.classes_), test_y)
    return {
        "test_top1": t1,
        "test_top5": t5,
        "best_C": best["C"],
        "val_top1": best["val_top1"],
        "backend": backend,
        "sweep": sweep,
    }


def logreg_features(feats: FeatureSet) -> np.ndarray:
    """The representation the protocol fits: the final normalised CLS token (or the raw pixels)."""
    return feats.knn_features().float().numpy()
