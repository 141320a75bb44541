"""Image to patch tokens with one strided convolution (key `patch_embed.proj.*`)."""

from __future__ import annotations

from torch import Tensor, nn


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        _, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {p}")
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D], N = (H/p) * (W/p)
