"""The tensor operations of the batched multi-crop augmentation (augment.py): resize and blur as matrix
products built per crop, grey-scale, hue shift, image -> float tensor. Each works on a whole group of crops
at once, with per-crop parameters."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as used by PIL's convert("L")


def blur_kernel_size(crop_size: int) -> int:
    """Odd Gaussian kernel size for a crop: 9 (the DINOv2 value) from 96 px up, down to 3 for tiny crops.

    A 9-tap kernel on a 28 px crop would reach across a third of the image; 2*floor(size/20)+1 keeps the
    kernel's reach proportional to the crop.
    """
    return int(min(9, max(3, 2 * (crop_size // 20) + 1)))


@lru_cache(maxsize=32)
def _tap_basis(size: int, k: int, device: str = "cpu") -> torch.Tensor:
    """[k, size * size] one-hot matrices: tap j of a 'reflect'-padded 1-D convolution of length ``size``.

    A blur matrix is then ``weights [m, k] @ basis``, one matmul instead of a scatter per crop group.
    """
    r = k // 2
    pos = torch.arange(size)[:, None] + torch.arange(-r, r + 1)[None, :]  # [size, k]: source of tap j at i
    if size == 1:
        pos = torch.zeros_like(pos)
    else:
        period = 2 * (size - 1)
        pos = pos.remainder(period)
        pos = torch.where(pos >= size, period - pos, pos)
    basis = torch.zeros(k, size, size)
    # (tap, output) pairs are unique, so plain assignment is exact; when reflection sends two taps of one
    # output to the same pixel, the weighted sum over taps adds them up.
    basis[torch.arange(k)[None, :], torch.arange(size)[:, None], pos] = 1.0
    return basis.view(k, size * size).to(device)


def _blur_matrices(sigma: torch.Tensor, size: int, k: int) -> torch.Tensor:
    """Per-crop Gaussian blur as a matrix [m, size, size] (reflect border), so blur = M @ x @ M^T.

    On small crops two batched matmuls are far cheaper than a grouped conv2d with per-crop kernels.
    """
    r = k // 2
    t2 = torch.arange(-r, r + 1, dtype=torch.float32, device=sigma.device) ** 2  # [k]
    w = torch.exp(t2 * (-0.5 / sigma.square())[:, None])  # [m, k]
    w = w / w.sum(dim=1, keepdim=True)
    return (w @ _tap_basis(size, k, str(sigma.device))).view(-1, size, size)  # [m, size, size]


def _cubic(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys cubic convolution kernel (a = -0.5, the value PIL and torch's antialiased bicubic use)."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1  # |t| < 1
    far = (((t - 5) * t + 8) * t - 4) * a  # 1 <= |t| < 2
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def _resize_matrices(
    start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Antialiased bicubic resampling of the windows [start, start + length) of an axis of ``in_size``
    pixels to ``out_size`` pixels, as matrices R [n, out_size, in_size] (so resized = R @ signal).

    Matches ``F.interpolate(mode="bicubic", antialias=True, align_corners=False)`` on the cropped window:
    output i samples the window at (i + 0.5) * scale with the kernel stretched by max(scale, 1) when
    shrinking; taps outside the window get zero weight and each row is renormalised. ``flip`` [n] bool
    mirrors the output (a horizontal flip folded into the resize for free).
    """
    start = start.to(torch.float32)[:, None, None]  # [n, 1, 1]
    length = length.to(torch.float32)[:, None, None]
    scale = length / out_size
    stretch = scale.clamp_min(1.0)
    i = torch.arange(out_size, dtype=torch.float32)[None, :, None]  # [1, out, 1]
    if flip is not None:
        i = torch.where(flip[:, None, None], out_size - 1 - i, i)  # [n, out, 1]
    centre = (i + 0.5) * scale  # [n, out, 1], in window coordinates
    src = torch.arange(in_size, dtype=torch.float32)[None, None, :] - start  # [n, 1, in]
    w = _cubic((src + 0.5 - centre) / stretch)  # [n, out, in]
    w = w * ((src >= 0) & (src < length))
    return w / w.sum(dim=2, keepdim=True)


@lru_cache(maxsize=4096)
def _window_matrix(start: int, length: int, in_size: int, out_size: int, flip: bool) -> torch.Tensor:
    """Cached [out_size, in_size] resize matrix of one window; small images have few distinct windows."""
    return _resize_matrices(
        torch.tensor([start]), torch.tensor([length]), in_size, out_size, torch.tensor([flip])
    )[0]


def _may_sync(x: torch.Tensor) -> bool:
    """Whether data-dependent shortcuts (skip a step no crop needs) may read values back to the host:
    on the CPU they save work; on an accelerator each would stall the stream, so everything is computed."""
    return x.device.type == "cpu"


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma of [n, C, H, W] as [n, 1, H, W] (identity for one channel)."""
    if x.shape[1] == 1:
        return x
    w = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images x [m, 3, H, W] in [0, 1] by ``shift`` [m] turns (HSV round trip)."""
    maxc, argmax = x.max(dim=1)  # [m, H, W]
    minc = x.min(dim=1).values
    delta = maxc - minc
    sat = delta / maxc.clamp_min(1e-8)
    safe = delta.clamp_min(1e-8)
    r, g, b = x.unbind(dim=1)
    # Hue in sixths of a turn, measured from the dominant channel.
    h6 = torch.where(
        argmax == 0, (g - b) / safe, torch.where(argmax == 1, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
    )
    h6 = torch.where(delta > 0, h6, torch.zeros_like(h6))
    h6 = (h6 + 6.0 * shift.view(-1, 1, 1)).remainder(6.0)  # [m, H, W]
    # HSV -> RGB: channel n = V - V*S*clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6, n = 5, 3, 1 for R, G, B.
    offs = x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = (offs + h6[:, None]).remainder(6.0)  # [m, 3, H, W]
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return maxc[:, None] - (maxc * sat)[:, None] * ramp


def _to_float_chw(img: Image.Image | torch.Tensor | np.ndarray, channels: int) -> torch.Tensor:
    """Convert an input image to float32 [C, H, W] in [0, 1] with the requested channel count."""
    if isinstance(img, Image.Image):
        want = "L" if channels == 1 else "RGB"
        if img.mode != want:
            img = img.convert(want)
        arr = np.array(img, dtype=np.uint8)  # [H, W] or [H, W, 3]; a copy, so the tensor owns writable memory
        t = torch.from_numpy(arr)
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
        return t.float().div_(255.0)
    t = torch.as_tensor(img)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise ValueError(f"expected an image [C, H, W] or [H, W], got shape {tuple(t.shape)}")
    t = t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()
    if t.shape[0] == channels:
        return t
    if t.shape[0] == 1 and channels == 3:
        return t.expand(3, -1, -1)
    if t.shape[0] == 3 and channels == 1:
        return _gray(t[None])[0]
    raise ValueError(f"cannot convert a {t.shape[0]}-channel image to {channels} channels")
