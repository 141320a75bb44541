"""iBOT block masks: budget never exceeded, ratio and probability respected, masks made of blocks."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
import torch

from dinolike.data import MaskGenerator, MaskSampler, sample_mask


def _components(mask: torch.Tensor) -> int:
    """Number of 4-connected components of True cells (plain BFS, independent of the generator)."""
    h, w = mask.shape
    cells = {(i, j) for i in range(h) for j in range(w) if mask[i, j]}
    seen: set[tuple[int, int]] = set()
    count = 0
    for start in cells:
        if start in seen:
            continue
        count += 1
        queue = deque([start])
        seen.add(start)
        while queue:
            i, j = queue.popleft()
            for nb in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                if nb in cells and nb not in seen:
                    seen.add(nb)
                    queue.append(nb)
    return count


@pytest.mark.parametrize("grid", [(7, 7), (14, 14), (6, 10)])
def test_mask_count_never_exceeds_target_and_rarely_falls_short(grid: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    mg = MaskGenerator(grid)
    n = grid[0] * grid[1]
    shortfalls = []
    for target in range(0, n // 2 + 1):
        for _ in range(4):
            mask = mg(target, gen)
            assert mask.shape == grid and mask.dtype == torch.bool
            got = int(mask.sum())
            assert got <= target
            shortfalls.append(target - got)
    assert max(shortfalls) < mg.min_num_patches  # documented: short by fewer than min_num_patches
    assert sum(shortfalls) / len(shortfalls) < 0.1


def test_masks_are_blocks_not_scattered_patches() -> None:
    gen = torch.Generator().manual_seed(1)
    mg = MaskGenerator((14, 14))
    block_sizes, scatter_sizes = [], []
    for _ in range(100):
        mask = mg(60, gen)
        block_sizes.append(int(mask.sum()) / _components(mask))
        scattered = torch.zeros(196, dtype=torch.bool)
        scattered[torch.randperm(196, generator=gen)[: int(mask.sum())]] = True
        scatter_sizes.append(60 / _components(scattered.view(14, 14)))
    mean_block = sum(block_sizes) / len(block_sizes)
    mean_scatter = sum(scatter_sizes) / len(scatter_sizes)
    assert mean_block >= 10 and mean_block > 3 * mean_scatter
    # Each placement is one filled rectangle of 1..budget patches.
    for budget in (1, 3, 4, 9, 20, 40):
        for _ in range(20):
            grid = np.zeros((14, 14), dtype=bool)
            added = mg._place_block(grid, budget, gen)
            assert 1 <= added <= budget and int(grid.sum()) == added
            rows, cols = grid.any(1).nonzero()[0], grid.any(0).nonzero()[0]
            assert grid[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()


def test_sample_mask_ratio_bounds_and_probability() -> None:
    gen = torch.Generator().manual_seed(2)
    grid, p, (lo, hi) = (14, 14), 0.3, (0.1, 0.5)
    n = 196
    draws = [sample_mask(gen, grid, mask_probability=p, mask_ratio=(lo, hi)) for _ in range(2000)]
    masked = [int(m.sum()) for m in draws]
    frac_masked = sum(c > 0 for c in masked) / len(masked)
    assert abs(frac_masked - p) < 5 * math.sqrt(p * (1 - p) / len(masked))
    ratios = [c / n for c in masked if c > 0]
    assert min(ratios) >= (math.floor(lo * n) - 3) / n  # lower bound minus the documented shortfall
    assert max(ratios) <= hi
    # Ratio is uniform over the range: its mean is close to the middle.
    assert abs(sum(ratios) / len(ratios) - (lo + hi) / 2) < 0.03


def test_mask_sampler_is_deterministic_given_generator_seed() -> None:
    sampler = MaskSampler((7, 7), mask_probability=1.0)
    a = [sampler(torch.Generator().manual_seed(s)) for s in range(20)]
    b = [sampler(torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert len({tuple(x.flatten().tolist()) for x in a}) > 10


def test_bad_mask_arguments() -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        sample_mask(torch.Generator(), (4, 4), mask_ratio=(0.6, 0.2))
    with pytest.raises(ValueError, match="grid"):
        MaskGenerator((0, 4))
