"""DINOv2-style linear probe: a whole grid of linear heads trained at once on frozen features.

Grid = learning rates x {last 1, last 4 blocks} x {CLS, CLS + avg-pooled patch tokens}. All heads of one
input kind share a single [D_in, H*C] weight matrix, so one matmul trains every learning rate together;
the best head is chosen on a validation split held out from train and only then measured on the test set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dinolike.eval.features import FeatureSet
from dinolike.eval.settings import LinearConfig


@dataclass(frozen=True)
class HeadKind:
    """Which features a head reads: CLS tokens of the last n blocks, optionally + pooled patch tokens."""

    n_last_blocks: int
    avgpool: bool

    @property
    def name(self) -> str:
        return f"blocks{self.n_last_blocks}{'_avgpool' if self.avgpool else ''}"


def split_train_val(
    n: int, val_fraction: float, seed: int, labels: Tensor | None = None, min_val_per_class: int = 1
) -> tuple[Tensor, Tensor]:
    """Random (seeded) disjoint index sets: the validation part is used only to pick hyperparameters.

    With `labels` [n] (a few-label split) the hold-out is class-stratified: each class with >= 2 images
    gives max(1, round(val_fraction * n_c)) of them, keeping at least one to fit; a class of one image
    keeps it to fit. The validation part is empty (everything fits) when every class has a single image
    (1 shot) or when some class would hold out fewer than `min_val_per_class` images: a hold-out of one
    image per class cannot tell dozens of heads apart (at 5 and 10 shots it picked heads 15-42 points
    below their neighbours), so the callers use their grid's fixed default instead of a coin toss.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if labels is not None:
        fit, val, smallest = _stratified_split(labels, val_fraction, seed)
        if smallest < min_val_per_class:
            return torch.cat([fit, val]), val[:0]
        return fit, val
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise ValueError(f"train set of {n} items is too small to hold out a validation split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def _stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor, int]:
    """(fit indices, validation indices, the smallest per-class validation count)."""
    g = torch.Generator().manual_seed(seed)
    fit, val, counts = [], [], []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()  # [n_c]
        members = members[torch.randperm(members.numel(), generator=g)]
        n_val = 0 if members.numel() < 2 else min(members.numel() - 1, max(1, round(members.numel() * val_fraction)))
        val.append(members[:n_val])
        fit.append(members[n_val:])
        counts.append(n_val)
    return torch.cat(fit), torch.cat(val), min(counts)


def standardizer(fit_rows: Tensor) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and spread of the fit rows [N, ...] -> (mu, sd), each [1, ...].

    Frozen features mix dimensions whose scales differ 20-fold (inner blocks' CLS tokens carry no final
    norm), which slows plain SGD on the small ones. A dimension that is constant in the fit rows keeps
    sd = 1: dividing by ~0 would blow up the held-out rows that do vary there (pixel borders at 1 shot).
    """
    mu = fit_rows.mean(dim=0, keepdim=True)
    sd = fit_rows.std(dim=0, keepdim=True, correction=0) if len(fit_rows) > 1 else torch.zeros_like(mu)
    return mu, torch.where(sd > 1e-6, sd, torch.ones_like(sd))


def head_kinds(feats: FeatureSet, n_last_blocks: Sequence[int], avgpool: Sequence[bool]) -> list[HeadKind]:
    """The grid's input kinds that these features support (raw pixels: one block, no patch tokens)."""
    kinds = []
    for n in sorted({min(int(n), feats.n_blocks) for n in n_last_blocks}):
        for a in sorted({bool(a) for a in avgpool}):
            if a and feats.patch_mean is None:
                continue
            kinds.append(HeadKind(n, a))
    if not kinds:
        raise ValueError("no usable head kind for these features")
    return kinds


def _topk_correct(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head correct counts: logits [H, B, C], y [B] -> (top1 [H], top5 [H])."""
    k = min(5, logits.shape[-1])
    pred = logits.topk(k, dim=-1).indices  # [H, B, k]
    hit = pred == y.view(1, -1, 1)  # [H, B, k]
    return hit[..., 0].sum(dim=1), hit.any(dim=-1).sum(dim=1)


def _nll_sum(logits: Tensor, y: Tensor) -> Tensor:
    """Per-head summed cross-entropy: logits [H, B, C], y [B] -> [H] (float64, summed over batches)."""
    h, b, c = logits.shape
    ce = F.cross_entropy(logits.reshape(-1, c).float(), y.repeat(h), reduction="none")  # [H*B]
    return ce.view(h, b).sum(dim=1).double()


def pick_head(heads: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The head with the best validation top-1; ties go to the lowest validation cross-entropy.

    Why the second key: on a small hold-out many heads tie on accuracy, and the first of them is the one
    at the smallest lr, often barely trained; the cross-entropy tells a confident head from a
    near-uniform one that happens to rank the right class first. It is no cure for a hold-out of one
    image per class (there it too picked lr 1e-5 on a split of raw pixels): split_train_val's
    `min_val_per_class` leaves such splits to the grid's default.
    """
    return min(heads, key=lambda h: (-h["val_top1"], h["val_loss"]))


class _HeadBank:
    """H linear heads (one per learning rate) over the same input: W [D_in, H, C], b [H, C]."""

    def __init__(self, d_in: int, n_heads: int, n_classes: int, gen: torch.Generator, device: torch.device):
        # DINOv2 initialises linear heads with N(0, 0.01) weights and zero bias
        w = torch.randn(d_in, n_heads, n_classes, generator=gen) * 0.01
        self.w = w.to(device).requires_grad_()
        self.b = torch.zeros(n_heads, n_classes, device=device, requires_grad=True)
        self.bufs = [torch.zeros_like(self.w), torch.zeros_like(self.b)]

    def logits(self, x: Tensor) -> Tensor:
        """x [B, D_in] -> logits [H, B, C] for every head with one matmul."""
        d_in, h, c = self.w.shape
        out = (x @ self.w.reshape(d_in, h * c)).view(x.shape[0], h, c) + self.b  # [B, H, C]
        return out.transpose(0, 1)

    @torch.no_grad()
    def sgd_step(self, lrs: Tensor, momentum: float, weight_decay: float) -> None:
        """SGD with momentum, each head with its own learning rate (lrs [H])."""
        for p, buf, lr in (
            (self.w, self.bufs[0], lrs.view(1, -1, 1)),
            (self.b, self.bufs[1], lrs.view(-1, 1)),
        ):
            g = p.grad
            if weight_decay:
                g = g.add(p, alpha=weight_decay)
            buf.mul_(momentum).add_(g)
            p.sub_(lr * buf)
            p.grad = None


def linear_probe(
    train: FeatureSet,
    test: FeatureSet,
    settings: LinearConfig,
    *,
    seed: int,
    device: str | torch.device,
    stratify: bool = False,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Train every (lr, input kind) head with cross-entropy, SGD + cosine decay; report the best one.

    Loss per head: CE(W^T x + b, y) = -log softmax(W^T x + b)_y averaged over the batch; the heads'
    losses are summed, which leaves each head's gradient exactly its own. Learning rates are scaled by
    batch_size / 256 (DINOv2). Accuracies are percentages.
    On CPU the torch thread pool is capped at `settings.cpu_threads` while training: every step is a handful of
    small matmuls, and thread synchronisation costs more than it gains (3x slower with 2 threads on a
    busy 2-core machine). None keeps torch's setting.
    A few-label split trains for at least `min_steps` SGD steps (10 epochs of 100 images would be 10
    steps) and holds out a class-stratified validation part (`stratify`, see split_train_val); without a
    hold-out (1 shot, or under `min_val_per_class` images of a class) every labelled image fits and the
    head is the grid's default: most blocks (+ pooled patches), middle lr.
    `standardize` z-scores every input dimension with the fit rows' statistics (see `standardizer`).
    """
    st = settings
    prev_threads = torch.get_num_threads()
    if torch.device(device).type == "cpu" and st.cpu_threads:
        torch.set_num_threads(min(st.cpu_threads, prev_threads))
    try:
        return _linear_probe(
            train,
            test,
            lrs=st.lrs,
            n_last_blocks=st.n_last_blocks,
            avgpool=st.avgpool,
            epochs=st.epochs,
            batch_size=st.batch_size,
            momentum=st.momentum,
            weight_decay=st.weight_decay,
            val_fraction=st.val_fraction,
            seed=seed,
            num_classes=num_classes,
            device=device,
            min_steps=st.min_steps if stratify else 0,  # the floor is for few-label splits only
            stratify=stratify,
            standardize=st.standardize,
            min_val_per_class=st.min_val_per_class,
        )
    finally:
        torch.set_num_threads(prev_threads)


def _linear_probe(
    train: FeatureSet,
    test: FeatureSet,
    *,
    lrs: Sequence[float],
    n_last_blocks: Sequence[int],
    avgpool: Sequence[bool],
    epochs: int,
    batch_size: int,
    momentum: float,
    weight_decay: float,
    val_fraction: float,
    seed: int,
    num_classes: int | None,
    device: str | torch.device,
    min_steps: int,
    stratify: bool,
    standardize: bool,
    min_val_per_class: int,
) -> dict[str, Any]:
    device = torch.device(device)
    if num_classes is None:
        num_classes = int(max(train.labels.max().item(), test.labels.max().item())) + 1
    labels = train.labels if stratify else None
    tr_idx, va_idx = split_train_val(len(train), val_fraction, seed, labels, min_val_per_class)
    kinds = head_kinds(train, n_last_blocks, avgpool)
    lr_t = torch.tensor([float(lr) * batch_size / 256.0 for lr in lrs], device=device)  # [H]
    gen = torch.Generator().manual_seed(seed)
    cls_all = train.cls.to(device)  # [N, L, D]
    pm_all = train.patch_mean.to(device) if train.patch_mean is not None else None
    y_all = train.labels.to(device)
    fit_rows = tr_idx.to(device)
    cls_stats = standardizer(cls_all[fit_rows].float()) if standardize else None  # 2 x [1, L, D]
    pm_stats = standardizer(pm_all[fit_rows].float()) if standardize and pm_all is not None else None  # 2 x [1, D]

    def prepare(cls: Tensor, pm: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """A batch's features as the heads read them: float, standardised when asked."""
        cls, pm = cls.float(), None if pm is None else pm.float()
        if cls_stats is not None:
            cls = (cls - cls_stats[0]) / cls_stats[1]
        if pm is not None and pm_stats is not None:
            pm = (pm - pm_stats[0]) / pm_stats[1]
        return cls, pm

    def inputs(cls: Tensor, pm: Tensor | None, kind: HeadKind) -> Tensor:
        parts = [cls[:, -kind.n_last_blocks :].flatten(1)]  # [B, n*D]
        if kind.avgpool:
            parts.append(pm)  # [B, D]
        return torch.cat(parts, dim=1)

    d = train.cls.shape[-1]
    banks = {
        k: _HeadBank(k.n_last_blocks * d + (d if k.avgpool else 0), len(lrs), num_classes, gen, device) for k in kinds
    }
    steps_per_epoch = math.ceil(len(tr_idx) / batch_size)
    epochs = max(epochs, math.ceil(min_steps / steps_per_epoch))
    total = max(1, epochs * steps_per_epoch)
    step = 0
    for _ in range(epochs):
        order = tr_idx[torch.randperm(len(tr_idx), generator=gen)].to(device)
        for s in range(steps_per_epoch):
            idx = order[s * batch_size : (s + 1) * batch_size]
            y = y_all[idx]
            cls_b, pm_b = prepare(cls_all[idx], pm_all[idx] if pm_all is not None else None)
            scale = 0.5 * (1.0 + math.cos(math.pi * step / total))  # cosine decay to 0
            for kind, bank in banks.items():
                logits = bank.logits(inputs(cls_b, pm_b, kind))  # [H, B, C]
                h = logits.shape[0]
                ce = F.cross_entropy(logits.reshape(-1, num_classes), y.repeat(h)) * h  # sum over the H heads
                ce.backward()
                bank.sgd_step(lr_t * scale, momentum, weight_decay)
            step += 1

    @torch.no_grad()
    def evaluate(
        feats: FeatureSet, rows: Tensor | None, only: HeadKind | None = None
    ) -> dict[HeadKind, tuple[Tensor, Tensor, Tensor, int]]:
        """Per input kind (or just `only`): top-1 and top-5 counts [H], summed cross-entropy [H] over `rows`,
        and their count."""
        res: dict[HeadKind, tuple[Tensor, Tensor, Tensor, int]] = {}
        n = len(feats) if rows is None else len(rows)
        for kind, bank in banks.items():
            if only is not None and kind != only:
                continue
            c1 = torch.zeros(len(lrs), dtype=torch.long, device=device)
            c5 = torch.zeros_like(c1)
            nll = torch.zeros(len(lrs), dtype=torch.float64, device=device)
            for start in range(0, n, 4096):
                sel = torch.arange(start, min(start + 4096, n)) if rows is None else rows[start : start + 4096]
                pm_b = feats.patch_mean[sel].to(device) if feats.patch_mean is not None else None
                cls_b, pm_b = prepare(feats.cls[sel].to(device), pm_b)
                logits, y = bank.logits(inputs(cls_b, pm_b, kind)), feats.labels[sel].to(device)  # [H, B, C], [B]
                t1, t5 = _topk_correct(logits, y)
                c1 += t1
                c5 += t5
                nll += _nll_sum(logits, y)
            res[kind] = (c1, c5, nll, n)
        return res

    val = evaluate(train, va_idx) if len(va_idx) else {k: (None, None, None, 0) for k in banks}
    heads = []
    for kind, (c1, _, nll, n) in val.items():
        for i, lr in enumerate(lrs):
            heads.append(
                {
                    "head": f"{kind.name}_lr{lr:g}",
                    "n_last_blocks": kind.n_last_blocks,
                    "avgpool": kind.avgpool,
                    "lr": float(lr),
                    "val_top1": 100.0 * c1[i].item() / n if n else float("nan"),
                    "val_loss": nll[i].item() / n if n else float("nan"),
                }
            )
    if len(va_idx):
        best = pick_head(heads)
    else:  # nothing held out to choose on: the richest input kind at the grid's middle lr
        best = heads[(len(kinds) - 1) * len(lrs) + len(lrs) // 2]
    best_kind = HeadKind(best["n_last_blocks"], best["avgpool"])
    lr_pos = [float(x) for x in lrs].index(best["lr"])
    t1, t5, _, nt = evaluate(test, None, only=best_kind)[best_kind]  # the test set sees only the chosen kind
    return {
        "test_top1": 100.0 * t1[lr_pos].item() / nt,
        "test_top5": 100.0 * t5[lr_pos].item() / nt,
        "val_top1": best["val_top1"],
        "best_head": best["head"],
        "best_lr": best["lr"],
        "best_n_last_blocks": best["n_last_blocks"],
        "best_avgpool": best["avgpool"],
        "n_fit": len(tr_idx),
        "n_val": len(va_idx),
        "heads": heads,
    }
