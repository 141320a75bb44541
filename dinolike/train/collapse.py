"""Collapse watch: stop a run whose representation has collapsed, instead of training on for hours.

DINO-style training has two degenerate solutions (DINO, Caron et al. 2021, sec. 5.3):
- *uniform*: every image gets the same features, so the teacher's targets are uniform over the K
  prototypes and the student learns to predict uniform outputs; the DINO loss sits at ln K and the
  entropy of the targets at ln K. With Sinkhorn-Knopp targets this is the one collapse left open
  (equal columns force identical rows to be uniform).
- *one prototype*: every image goes to the same few prototypes; the batch-mean student prediction has
  an entropy near 0 (softmax centring without enough sharpening, or too little of it).

The loop hands every logged row (window means over all ranks, so every rank decides alike) to
`CollapseWatch.update`. A symptom must hold for `collapse.patience_iters` iterations in a row before the
run is stopped, and nothing is judged before `collapse.start_iters`: at initialisation the loss is near
ln K too. While a symptom holds, periodic checkpoints are held back (`suspect`), so the newest checkpoint
on disk is from before the onset when the run stops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig


class CollapseError(RuntimeError):
    """The representation collapsed; the message names the iteration, the symptom and what to change."""


KNOBS = (
    "lower optim.base_lr or lengthen optim.warmup_epochs, raise loss.koleo_weight, keep local crops "
    "(crops.local_number) and iBOT on, or check the teacher temperature (teacher.temp)"
)


@dataclass
class CollapseWatch:
    """Judges logged rows; `update(it, row)` raises `CollapseError` once a symptom has been sustained.

    Thresholds are fractions of ln K. Uniform: the DINO global loss at or above `loss_ratio` (the student
    predicts flat outputs) while the teacher-target entropy is at or above `teacher_entropy_ratio`. Measured
    on the CPU recipe (BENCHMARKS.md section 1b): a real collapse sits at a loss of 0.99-1.0 ln K with
    targets at 0.93-0.96 ln K; healthy runs after the warmup stay below 0.95 ln K in loss, and their
    targets below 0.88 ln K even at initialisation. One prototype: the batch-mean student prediction's
    entropy at or below `min_mean_entropy_ratio` of ln K.
    """

    n_prototypes: int
    enabled: bool = True
    start_iters: int = 0
    patience_iters: int = 200
    loss_ratio: float = 0.98
    teacher_entropy_ratio: float = 0.9
    min_mean_entropy_ratio: float = 0.2
    onset: int | None = None
    symptom: str | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> CollapseWatch:
        c = cfg.collapse
        start = c.start_iters
        if start is None:  # default: after the lr warmup (the loss starts near ln K anyway)
            start = int(cfg.optim.warmup_epochs * cfg.optim.epoch_length)
        for name in ("patience_iters", "loss_ratio", "teacher_entropy_ratio", "min_mean_entropy_ratio"):
            if c[name] is None or c[name] < 0:
                raise ValueError(f"collapse.{name} must be >= 0, got {c[name]}")
        if start < 0:
            raise ValueError(f"collapse.start_iters must be >= 0 or null, got {start}")
        return cls(n_prototypes=cfg.heads.out_dim, enabled=bool(c.enabled), start_iters=int(start),
                   patience_iters=int(c.patience_iters), loss_ratio=float(c.loss_ratio),
                   teacher_entropy_ratio=float(c.teacher_entropy_ratio),
                   min_mean_entropy_ratio=float(c.min_mean_entropy_ratio))

    @property
    def suspect(self) -> bool:
        """A symptom holds now (not yet long enough to stop): checkpoints written now could be bad."""
        return self.onset is not None

    def diagnose(self, row: dict[str, float]) -> str | None:
        """The symptom a row shows, in words, or None when it looks healthy (or lacks the signals)."""
        ln_k = math.log(self.n_prototypes)
        loss, t_h, s_h = row.get("dino_global_loss"), row.get("teacher_entropy"), row.get("student_mean_entropy")
        if loss is not None and t_h is not None and loss >= self.loss_ratio * ln_k \
                and t_h >= self.teacher_entropy_ratio * ln_k:
            return (f"uniform outputs: DINO loss {loss:.3f} at ln K = {ln_k:.3f} and near-flat teacher "
                    f"targets (entropy {t_h:.3f}): the images no longer get different outputs")
        if s_h is not None and s_h <= self.min_mean_entropy_ratio * ln_k:
            return (f"one-prototype outputs: the mean student prediction has entropy {s_h:.3f} of "
                    f"ln K = {ln_k:.3f} (every image goes to the same few prototypes)")
        return None

    def update(self, it: int, row: dict[str, float], last_checkpoint: str | None = None) -> None:
        """Take one logged row (window means over all ranks); raise once a symptom lasted `patience_iters`."""
        if not self.enabled or it < self.start_iters:
            return
        symptom = self.diagnose(row)
        if symptom is None:
            self.onset, self.symptom = None, None
            return
        if self.onset is None:
            self.onset, self.symptom = it, symptom
        if it - self.onset >= self.patience_iters:
            ko = row.get("koleo_loss")
            ko_text = f", KoLeo {ko:.3f}" if ko is not None else ""
            where = f"the newest checkpoint, {last_checkpoint}, is from before the onset" if last_checkpoint \
                else "no checkpoint was written before the onset"
            raise CollapseError(
                f"training collapsed at iteration {self.onset} and stayed collapsed to iteration {it}: "
                f"{symptom}{ko_text}. The run stopped; {where}. Likely knobs: {KNOBS}. "
                "(collapse.enabled=false turns this check off.)"
            )
