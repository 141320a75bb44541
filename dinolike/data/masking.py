"""iBOT block-wise patch masks (BEiT / DINOv2 style).

Masking contiguous rectangles instead of scattered patches makes masked-token prediction harder (a hidden
patch cannot simply be copied from its visible neighbour), which is what the iBOT loss relies on.
All randomness comes from an explicit ``torch.Generator`` so a mask depends only on the seed the data
pipeline derives from (seed, epoch, sample index), never on worker scheduling or the global RNG.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

__all__ = ["MaskGenerator", "MaskSampler", "sample_mask"]

_ATTEMPTS_PER_BLOCK = 10


class MaskGenerator:
    """Places random rectangular blocks on an ``h x w`` patch grid until a target count is masked.

    Each block has an area drawn uniformly in ``[min_num_patches, budget]`` (budget = patches still to mask,
    capped at ``max_block_frac * h * w``) and a log-uniform aspect ratio in ``[min_aspect, max_aspect]``.
    A block is accepted only if it adds between 1 and ``budget`` new patches, so the result never exceeds
    the target. When ``_ATTEMPTS_PER_BLOCK`` consecutive tries fail the generator stops, so it may fall
    short of the target by a few patches (typically fewer than ``min_num_patches``).
    """

    def __init__(
        self,
        grid: tuple[int, int],
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = 1 / 0.3,
        max_block_frac: float | None = None,
    ) -> None:
        h, w = int(grid[0]), int(grid[1])
        if h < 1 or w < 1:
            raise ValueError(f"mask grid must be positive, got {grid}")
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if not 0 < min_aspect <= max_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        self.grid = (h, w)
        self.num_patches = h * w
        self.min_num_patches = int(min_num_patches)
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        if max_block_frac is None:
            self.max_block = self.num_patches
        else:
            if not 0 < max_block_frac <= 1:
                raise ValueError(f"max_block_frac must be in (0, 1], got {max_block_frac}")
            self.max_block = max(self.min_num_patches, int(max_block_frac * self.num_patches))

    def _place_block(self, mask: np.ndarray, budget: int, generator: torch.Generator) -> int:
        """Mask one rectangle adding 1..budget new patches; return how many it added (0 = gave up)."""
        h_grid, w_grid = self.grid
        lo = min(self.min_num_patches, budget)
        draws = torch.rand(_ATTEMPTS_PER_BLOCK, 4, generator=generator).tolist()  # area, aspect, top, left
        for u_area, u_aspect, u_top, u_left in draws:
            area = lo + u_area * (budget - lo)
            aspect = math.exp(self.log_aspect[0] + u_aspect * (self.log_aspect[1] - self.log_aspect[0]))
            bh = min(h_grid, max(1, round(math.sqrt(area * aspect))))
            bw = min(w_grid, max(1, round(math.sqrt(area / aspect))))
            top = min(int(u_top * (h_grid - bh + 1)), h_grid - bh)
            left = min(int(u_left * (w_grid - bw + 1)), w_grid - bw)
            block = mask[top : top + bh, left : left + bw]
            new = bh * bw - int(block.sum())
            if 0 < new <= budget:
                block[...] = True
                return new
        return 0

    def __call__(self, num_masking_patches: int, generator: torch.Generator) -> torch.Tensor:
        """Return a bool mask [h, w] with at most ``num_masking_patches`` True entries, in blocks."""
        target = max(0, min(int(num_masking_patches), self.num_patches))
        mask = np.zeros(self.grid, dtype=bool)  # [h, w]
        count = 0
        while count < target:
            added = self._place_block(mask, min(target - count, self.max_block), generator)
            if added == 0:
                break
            count += added
        return torch.from_numpy(mask)


@lru_cache(maxsize=64)
def _generator_for(
    grid: tuple[int, int], min_num_patches: int, max_block_frac: float | None
) -> MaskGenerator:
    return MaskGenerator(grid, min_num_patches=min_num_patches, max_block_frac=max_block_frac)


def sample_mask(
    generator: torch.Generator,
    grid: tuple[int, int],
    mask_probability: float = 0.5,
    mask_ratio: tuple[float, float] = (0.1, 0.5),
    min_num_patches: int = 4,
    max_block_frac: float | None = None,
) -> torch.Tensor:
    """Mask one global crop: with probability ``mask_probability`` mask ``floor(r * h * w)`` patches,
    r ~ U(mask_ratio); otherwise return an all-False mask. Returns bool [h, w].

    Two uniforms are always drawn first, so the generator advances the same way whether or not the crop
    ends up masked (keeps later draws of the same stream reproducible).
    """
    lo, hi = mask_ratio
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"mask_ratio must satisfy 0 <= lo <= hi <= 1, got {mask_ratio}")
    u_apply, u_ratio = torch.rand(2, generator=generator).tolist()
    grid = (int(grid[0]), int(grid[1]))
    if u_apply >= mask_probability:
        return torch.zeros(grid, dtype=torch.bool)
    n = int((lo + u_ratio * (hi - lo)) * grid[0] * grid[1])
    return _generator_for(grid, int(min_num_patches), max_block_frac)(n, generator)


class MaskSampler:
    """Picklable ``mask_fn`` for :class:`~dinolike.data.ssl.SSLDataset`: ``generator -> bool [h, w]``."""

    def __init__(
        self,
        grid: tuple[int, int],
        mask_probability: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        min_num_patches: int = 4,
        max_block_frac: float | None = None,
    ) -> None:
        self.grid = (int(grid[0]), int(grid[1]))
        self.mask_probability = float(mask_probability)
        self.mask_ratio = (float(mask_ratio[0]), float(mask_ratio[1]))
        self.min_num_patches = int(min_num_patches)
        self.max_block_frac = max_block_frac

    def __call__(self, generator: torch.Generator) -> torch.Tensor:
        return sample_mask(
            generator, self.grid, self.mask_probability, self.mask_ratio, self.min_num_patches,
            self.max_block_frac,
        )

    def __repr__(self) -> str:
        return (
            f"MaskSampler(grid={self.grid}, p={self.mask_probability}, ratio={self.mask_ratio}, "
            f"min_num_patches={self.min_num_patches})"
        )
