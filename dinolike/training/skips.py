"""Unreadable training images: counted once per file and once per draw, named, and limited.

A corrupt file is met again every epoch, so "skipped" alone says little: `skipped_files` counts distinct
bad files (what to fix) and `skipped_draws` counts samples not trained on (what the run lost). Above
`data.max_skipped_fraction` of the draws in a window of `data.skip_window` images the run stops with
an error naming a few bad files: training on a folder that is mostly unreadable (a stale network mount,
a half-copied dataset) is a failure, not a run with a quietly smaller dataset.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from dinolike import dist
from dinolike.data.datasets import DataError

_EXAMPLES = 3  # bad files named in the error


class TooManySkipsError(DataError):
    """The share of unreadable images drawn went above data.max_skipped_fraction."""


class SkipGuard:
    """Per-rank counts between syncs; totals, bad-file set and window agreed over ranks at each `check`.

    `check` is a collective: every rank calls it at the same iterations (the loop's log iterations)."""

    def __init__(self, max_fraction: float, window: int, min_draws: int, name_of: Callable[[int], str]) -> None:
        self.max_fraction, self.window, self.min_draws = max_fraction, max(1, window), max(1, min_draws)
        self.name_of = name_of
        self.bad_files: set[int] = set()  # dataset indices, union over ranks
        self.examples: list[str] = []
        self.draws = self.skipped_draws = 0  # over ranks, since the start of the run
        self._draws = self._skipped = 0  # this rank, since the last check
        self._new_bad: set[int] = set()
        self._recent: deque[tuple[int, int]] = deque()  # (draws, skipped) per check, over ranks

    def add(self, batch: dict[str, Any], unused: int = 0) -> None:
        """A batch this rank drew: its failed samples, plus `unused` readable ones that were not trained on
        (a step every rank skips because one rank's batch came back empty)."""
        self._draws += batch["batch_size"] + batch["skipped"]
        self._skipped += batch["skipped"] + unused
        self._new_bad.update(batch.get("skipped_indices", ()))

    def sync(self) -> None:
        """Merge every rank's counts since the last sync (collective)."""
        local = torch.tensor([self._draws, self._skipped, len(self._new_bad)], dtype=torch.float64,
                             device=dist.current_device())  # [3]
        draws, skipped, n_new = (int(v) for v in dist.all_reduce_sum(local).tolist())
        if n_new:  # rare: a list exchange only when some rank met a bad file
            for found in dist.all_gather_objects(sorted(self._new_bad)):
                for i in found:  # type: ignore[attr-defined]
                    if i not in self.bad_files and len(self.examples) < _EXAMPLES:
                        self.examples.append(self.name_of(i))
                    self.bad_files.add(i)
        self.draws += draws
        self.skipped_draws += skipped
        self._recent.append((draws, skipped))
        while len(self._recent) > 1 and sum(d for d, _ in self._recent) - self._recent[0][0] >= self.window:
            self._recent.popleft()
        self._draws = self._skipped = 0
        self._new_bad.clear()

    def check(self, it: int) -> dict[str, int]:
        """Sync, then raise TooManySkipsError above the limit; returns the counts for metrics.jsonl."""
        self.sync()
        draws, skipped = sum(d for d, _ in self._recent), sum(s for _, s in self._recent)
        if draws >= self.min_draws and skipped > self.max_fraction * draws:
            raise TooManySkipsError(
                f"{skipped} of the last {draws} images drawn were unreadable at iteration {it} "
                f"({100 * skipped / draws:.1f}% > data.max_skipped_fraction={self.max_fraction}); "
                f"{len(self.bad_files)} bad file(s), e.g. {', '.join(self.examples)}. Fix or remove them, "
                "or raise data.max_skipped_fraction"
            )
        return {"skipped_files": len(self.bad_files), "skipped_draws": self.skipped_draws}

    def state_dict(self) -> dict[str, Any]:
        """The run's totals (collective: syncs first, so no rank's recent draws are left out)."""
        self.sync()
        return {"files": sorted(self.bad_files), "examples": list(self.examples), "draws": self.draws,
                "skipped_draws": self.skipped_draws}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:  # checkpoints from before the counts existed have none
            self.bad_files = set(state["files"])
            self.examples = list(state["examples"])
            self.draws, self.skipped_draws = int(state["draws"]), int(state["skipped_draws"])
