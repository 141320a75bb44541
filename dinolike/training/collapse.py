"""Collapse watch: stop a run whose representation has collapsed, instead of training on for hours.

DINO-style training has two degenerate solutions (DINO, Caron et al. 2021, sec. 5.3):
- *uniform*: every image gets the same features, so the teacher's targets are uniform over the K
  prototypes and the student learns to predict uniform outputs; the DINO loss sits at ln K and the
  entropy of the targets at ln K. With Sinkhorn-Knopp targets this is the one collapse left open
  (equal columns force identical rows to be uniform).
- *one prototype*: every image goes to the same few prototypes; the batch-mean student prediction has
  an entropy near 0 (softmax centring without enough sharpening, or too little of it).
- *constant embeddings*: the backbone gives every image the same CLS embedding (mean cosine between the
  images of a batch ~1, eval/spread.py), the root of the uniform collapse, and where a ViT with
  LayerScale 1e-5 starts. It is watched from the first logged row: its first sighting is a warning (a large
  model in a long run grows out of it during the lr warmup; a small or short one may never), it stops the
  run like the others when it lasts past `start_iters` + patience, and a run that ends with it fails
  (`final_verdict`) instead of exporting a backbone that tells no two images apart.

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

from dinolike.errors import DinolikeError
from dinolike.eval.spread import CONSTANT_COSINE


class CollapseError(DinolikeError, RuntimeError):
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
    max_cls_cosine: float = CONSTANT_COSINE
    layerscale: float | None = None
    onset: int | None = None
    symptom: str | None = None
    warned_constant: bool = False
    constant_at: int | None = None  # iteration of the last logged row, when it showed constant embeddings

    @classmethod
    def from_config(cls, cfg: DictConfig) -> CollapseWatch:
        c = cfg.collapse
        start = c.start_iters
        if start is None:  # default: after the lr warmup (the loss starts near ln K anyway)
            start = int(cfg.optim.warmup_epochs * cfg.optim.epoch_length)
        for name in ("patience_iters", "loss_ratio", "teacher_entropy_ratio", "min_mean_entropy_ratio",
                     "max_cls_cosine"):
            if c[name] is None or c[name] < 0:
                raise ValueError(f"collapse.{name} must be >= 0, got {c[name]}")
        if start < 0:
            raise ValueError(f"collapse.start_iters must be >= 0 or null, got {start}")
        return cls(n_prototypes=cfg.heads.out_dim, enabled=bool(c.enabled), start_iters=int(start),
                   patience_iters=int(c.patience_iters), loss_ratio=float(c.loss_ratio),
                   teacher_entropy_ratio=float(c.teacher_entropy_ratio),
                   min_mean_entropy_ratio=float(c.min_mean_entropy_ratio), max_cls_cosine=float(c.max_cls_cosine),
                   layerscale=cfg.model.layerscale)

    @property
    def suspect(self) -> bool:
        """A symptom holds now (not yet long enough to stop): checkpoints written now could be bad."""
        return self.onset is not None

    def constant(self, row: dict[str, float]) -> str | None:
        """The constant-embeddings symptom of a row, in words, or None."""
        c = row.get("cls_cosine")
        if c is None or c < self.max_cls_cosine:
            return None
        return (f"constant embeddings: every image gets the same CLS embedding (mean cosine {c:.5f} between "
                "the images of a batch)")

    def advice(self) -> str:
        """What to change against constant embeddings, naming LayerScale when it is the likely cause."""
        if self.layerscale is not None and self.layerscale < 1e-3:
            return (f"with model.layerscale={self.layerscale:g} every block starts almost switched off, so a new "
                    "ViT gives every image the same embedding until LayerScale has grown; a long large-model "
                    "run does that during its lr warmup, a small model or a short run may never: use "
                    "model.layerscale=0.1 (CaiT's value up to 18 blocks) or 1.0")
        return f"likely knobs: {KNOBS}"

    def diagnose(self, row: dict[str, float]) -> str | None:
        """The symptom a row shows, in words, or None when it looks healthy (or lacks the signals)."""
        constant = self.constant(row)
        if constant is not None:
            return constant
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

    def update(self, it: int, row: dict[str, float], last_checkpoint: str | None = None) -> str | None:
        """Take one logged row (window means over all ranks); raise once a symptom lasted `patience_iters`.
        Returns a warning to log (once per run) when the row shows constant embeddings, whatever the
        iteration: the run may grow out of them, but the user must not learn of them only at the end."""
        if not self.enabled:
            return None
        constant = self.constant(row)
        self.constant_at = it if constant else None
        warning = None
        if constant and not self.warned_constant:
            self.warned_constant = True
            stop = max(it, self.start_iters) + self.patience_iters
            warning = (f"iteration {it}: {constant}: the backbone does not tell images apart yet; "
                       f"{self.advice()}. The run stops if this lasts to iteration {stop}, and fails at "
                       "its end if it is still so then.")
        if it < self.start_iters:
            return warning
        symptom = self.diagnose(row)
        if symptom is None:
            self.onset, self.symptom = None, None
            return warning
        if self.onset is None:
            self.onset, self.symptom = it, symptom
        if it - self.onset >= self.patience_iters:
            ko = row.get("koleo_loss")
            ko_text = f", KoLeo {ko:.3f}" if ko is not None else ""
            where = f"the newest checkpoint, {last_checkpoint}, is from before the onset" if last_checkpoint \
                else "no checkpoint was written before the onset"
            knobs = self.advice() if self.constant(row) else f"likely knobs: {KNOBS}"
            raise CollapseError(
                f"training collapsed at iteration {self.onset} and stayed collapsed to iteration {it}: "
                f"{symptom}{ko_text}. The run stopped; {where}. {knobs[0].upper()}{knobs[1:]}. "
                "(collapse.enabled=false turns this check off.)"
            )
        return warning

    def final_verdict(self, it: int, checkpoint: str, backbone_cosine: float | None = None) -> None:
        """At the end of a run: raise when its last logged row still showed constant embeddings, so the
        run fails instead of exporting a backbone that gives every image the same embedding.
        `backbone_cosine`: the kept backbone's cosine over probe images, for a run with no row to judge
        (a finished run started again, which would otherwise export it)."""
        constant = self.constant_at == it or (backbone_cosine is not None and backbone_cosine >= self.max_cls_cosine)
        if self.enabled and constant:
            raise CollapseError(
                f"training ended at iteration {it} with constant embeddings: every image still gets the same "
                f"CLS embedding, so the backbone is useless and was not exported ({checkpoint} is kept for "
                f"inspection). {self.advice()[0].upper()}{self.advice()[1:]}. "
                "(collapse.enabled=false turns this check off.)"
            )
