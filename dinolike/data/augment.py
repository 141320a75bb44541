"""DINOv2 multi-crop augmentation, implemented on batched tensors for speed.

Recipe per crop (as in DINOv2): random resized crop (bicubic) -> horizontal flip -> colour jitter
(brightness, contrast, saturation, hue in random order, applied with probability ``jitter_p``) ->
random grayscale -> Gaussian blur -> solarize -> normalise. The first global crop is always blurred, the
second rarely blurred but sometimes solarised, local crops blurred half of the time.

Why not torchvision's per-crop PIL pipeline: for the CPU recipe (28 px Fashion-MNIST, ~8 crops per
image) per-call overhead dominates, so every step after the resize works on all crops of a group at once
with per-crop random parameters (see ``benchmarks/bench_augment.py`` for the numbers). All random numbers
come from one ``torch.Generator`` so a sample's crops are a pure function of that generator's seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .augment_ops import (
    _blur_matrices,
    _gray,
    _may_sync,
    _shift_hue,
    _to_float_chw,
    _window_matrix,
    blur_kernel_size,
)
from .normalize import default_stats

__all__ = ["MultiCropAugmentation", "blur_kernel_size"]

_SOLARIZE_THRESHOLD = 128 / 255  # PIL ImageOps.solarize default
_RRC_ATTEMPTS = 10
_MATRIX_RESIZE_MAX_PIXELS = 64 * 64  # above this, per-crop F.interpolate is faster

# Columns of the per-crop uniform draws (one torch.rand call per crop group).
_U_FLIP, _U_JIT, _U_BRI, _U_CON, _U_SAT, _U_HUE = 0, 1, 2, 3, 4, 5
_U_ORDER = slice(6, 10)
_U_GRAY, _U_BLUR, _U_SIGMA, _U_SOL = 10, 11, 12, 13
_N_UNIFORMS = 14


class MultiCropAugmentation:
    """DINOv2 multi-crop: 2 global crops (also returned as the teacher's views) and ``local_crops_number``
    local crops, each a normalised float32 tensor [C, size, size].

    ``mean``/``std`` default to the ImageNet statistics for ``channels=3`` and the Fashion-MNIST ones for
    ``channels=1``. With one channel, saturation, hue and random grayscale are no-ops. The blur kernel
    follows :func:`blur_kernel_size` unless ``blur_kernel_size`` is given.

    Call as ``aug(img, generator)``; without a generator the global torch RNG is used. With
    ``photometric_on_device`` the crops come back after the geometric half (crop, resize, flip) with
    their photometric draws, and :meth:`finish_batch` completes a collated batch on the training device.
    """

    accepts_generator = True  # SSLDataset passes a per-sample generator instead of reseeding the global RNG

    def __init__(
        self,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        global_crops_scale: tuple[float, float] = (0.32, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.32),
        local_crops_number: int = 8,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels: int = 3,
        flip_p: float = 0.5,
        jitter_p: float = 0.8,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        gray_p: float = 0.2,
        blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5),
        solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_kernel_size: int | None = None,
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        photometric_on_device: bool = False,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        if blur_kernel_size is not None and (blur_kernel_size < 1 or blur_kernel_size % 2 == 0):
            raise ValueError(f"blur_kernel_size must be odd and positive, got {blur_kernel_size}")
        if len(blur_p) != 3 or len(solarize_p) != 3:
            raise ValueError("blur_p and solarize_p take 3 values: (global crop 1, global crop 2, locals)")
        scales = {"global_crops_scale": global_crops_scale, "local_crops_scale": local_crops_scale}
        for name, (lo, hi) in scales.items():
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")
        if len(crop_ratio) != 2 or not 0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(f"crop_ratio (width / height) must satisfy 0 < lo <= hi, got {tuple(crop_ratio)}")
        default_mean, default_std = default_stats(channels)
        mean = mean if mean is not None else default_mean
        std = std if std is not None else default_std
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} values, got {len(mean)} and {len(std)}")
        self.global_crops_size = int(global_crops_size)
        self.local_crops_size = int(local_crops_size)
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = int(local_crops_number)
        self.channels = channels
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.flip_p = float(flip_p)
        self.jitter_p = float(jitter_p)
        self.jitter = tuple(float(j) for j in jitter)
        self.gray_p = float(gray_p)
        self.blur_p = tuple(float(p) for p in blur_p)
        self.solarize_p = tuple(float(p) for p in solarize_p)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.blur_kernel_size = blur_kernel_size
        self.log_ratio = (math.log(crop_ratio[0]), math.log(crop_ratio[1]))
        self.photometric_on_device = bool(photometric_on_device)
        jb, jc, js, _ = self.jitter
        self._jitter_lo = torch.tensor([1 - jb, 1 - jc, 1 - js]).clamp_min(0)  # [3]
        self._jitter_span = torch.tensor([1 + jb, 1 + jc, 1 + js]) - self._jitter_lo
        self._global_blur_p = torch.tensor(self.blur_p[:2])  # [2]: global crop 1, global crop 2
        self._global_sol_p = torch.tensor(self.solarize_p[:2])
        self._mean_t = torch.tensor(self.mean).view(1, -1, 1, 1)
        self._std_t = torch.tensor(self.std).view(1, -1, 1, 1)
        self._on_device: dict[str, tuple[torch.Tensor, ...]] = {}

    def _consts(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(jitter lo, jitter span, mean, std) on `device`, copied there once (a copy per batch would wait
        for the device's queue)."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = tuple(
                t.to(device) for t in (self._jitter_lo, self._jitter_span, self._mean_t, self._std_t))
        return self._on_device[key]

    # ------------------------------------------------------------------------------------ geometry

    def _boxes(
        self, height: int, width: int, n: int, scale: tuple[float, float], generator: torch.Generator | None
    ) -> list[tuple[int, int, int, int]]:
        """RandomResizedCrop boxes (top, left, h, w): 10 tries of (area, log-aspect), else a centre crop."""
        draws = torch.rand(n, _RRC_ATTEMPTS, 4, generator=generator).tolist()  # area, ratio, top, left
        area = height * width
        boxes = []
        for attempts in draws:
            for u_area, u_ratio, u_top, u_left in attempts:
                target = area * (scale[0] + u_area * (scale[1] - scale[0]))
                aspect = math.exp(self.log_ratio[0] + u_ratio * (self.log_ratio[1] - self.log_ratio[0]))
                w = round(math.sqrt(target * aspect))
                h = round(math.sqrt(target / aspect))
                if 0 < w <= width and 0 < h <= height:
                    top = min(int(u_top * (height - h + 1)), height - h)
                    left = min(int(u_left * (width - w + 1)), width - w)
                    boxes.append((top, left, h, w))
                    break
            else:  # fallback: largest centred crop with an aspect ratio inside the allowed range
                in_ratio = width / height
                lo, hi = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
                if in_ratio < lo:
                    w, h = width, round(width / lo)
                elif in_ratio > hi:
                    w, h = round(height * hi), height
                else:
                    w, h = width, height
                boxes.append(((height - h) // 2, (width - w) // 2, h, w))
        return boxes

    # ----------------------------------------------------------------------------------- one group

    def _crop_group(
        self,
        x: torch.Tensor,
        n: int,
        size: int,
        scale: tuple[float, float],
        blur_p: torch.Tensor,
        solarize_p: torch.Tensor,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The geometric half of ``n`` crops of x [C, H, W] (float in [0, 1]): crops [n, C, size, size] in
        [0, 1] and their photometric draws [n, 14] (blur and solarize already decided: 1.0 = apply), which
        :meth:`photometric` turns into the finished crops, here or on the training device."""
        _, height, width = x.shape
        boxes = self._boxes(height, width, n, scale, generator)
        u = torch.rand(n, _N_UNIFORMS, generator=generator)  # all per-crop random numbers of this group
        u[:, _U_BLUR] = (u[:, _U_BLUR] < blur_p).float()
        u[:, _U_SOL] = (u[:, _U_SOL] < solarize_p).float()

        flips = u[:, _U_FLIP] < self.flip_p  # [n]
        if height * width <= _MATRIX_RESIZE_MAX_PIXELS:
            # Small images: all crops of the group in two batched matmuls, flip folded into the matrices.
            flip_list = flips.tolist()
            rows = torch.stack([_window_matrix(t, h, height, size, False) for t, _, h, _ in boxes])
            cols = torch.stack(
                [_window_matrix(b[1], b[3], width, size, fl) for b, fl in zip(boxes, flip_list, strict=True)]
            )  # rows [n, size, H], cols [n, size, W]
            out = rows[:, None] @ x[None] @ cols[:, None].transpose(-1, -2)  # [n, C, size, size]
        else:
            # Large images: a matmul would touch every pixel; interpolate each box separately instead.
            crops = []
            for (top, left, h, w), flip in zip(boxes, flips.tolist(), strict=True):
                c = F.interpolate(
                    x[None, :, top : top + h, left : left + w], size=(size, size), mode="bicubic",
                    align_corners=False, antialias=True,
                )
                crops.append(c.flip(-1) if flip else c)
            out = torch.cat(crops)  # [n, C, size, size]
        return out.clamp_(0.0, 1.0), u  # clamp: bicubic overshoots

    def photometric(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Colour jitter -> grayscale -> blur -> solarize -> normalise crops x [n, C, s, s] in [0, 1] with
        their draws u [n, 14] from the geometric half; on any device (``data.augment_on_device`` runs it
        on the GPU over a whole batch, where it costs a CPU loader worker two thirds of its time)."""
        n = x.shape[0]
        out = self._color_jitter(x, u)
        if self.channels == 3 and self.gray_p > 0:
            to_gray = (u[:, _U_GRAY] < self.gray_p).view(n, 1, 1, 1)
            out = torch.where(to_gray, _gray(out).expand_as(out), out)
        out = self._blur(out, u[:, _U_BLUR] > 0.5, u[:, _U_SIGMA])
        sol = (u[:, _U_SOL] > 0.5).view(n, 1, 1, 1)
        if not _may_sync(x) or bool(sol.any()):
            out = torch.where(sol & (out >= _SOLARIZE_THRESHOLD), 1.0 - out, out)
        mean, std = self._consts(out.device)[2:]
        return (out - mean) / std

    def _color_jitter(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """torchvision-style ColorJitter with a random op order per crop, applied with prob ``jitter_p``.

        Brightness, contrast and saturation are all blends ``clamp(a*x + b*mean(gray) + c*gray)``:
        brightness (a=f), contrast (a=f, b=1-f), saturation (a=f, c=1-f), identity (a=1, b=c=0). So each
        of the four order steps is one fused blend over the whole group (a crop whose op at that step is
        hue, or that is not jittered, takes the identity); hue is applied to the crops whose hue step it is.
        """
        n = x.shape[0]
        on_host = _may_sync(x)
        on = u[:, _U_JIT] < self.jitter_p  # [n]
        if self.jitter_p <= 0 or (on_host and not bool(on.any())):
            return x
        jh = self.jitter[3]
        rgb = self.channels == 3
        lo, span = self._consts(x.device)[:2]
        f = lo + u[:, _U_BRI : _U_SAT + 1] * span  # [n, 3]: brightness, contrast, saturation factors
        hue = (u[:, _U_HUE] * 2 - 1) * jh  # [n], in turns
        op = u[:, _U_ORDER].argsort(dim=1).T  # [4, n]: op (0 bri, 1 con, 2 sat, 3 hue) per step and crop
        op = torch.where(on, op, -1)
        if not rgb:
            op = torch.where(op >= 2, -1, op)  # saturation and hue do nothing to one channel
        f_op = f.T.gather(0, op.clamp(0, 2))  # [4, n]: the factor of each step's op
        a = torch.where((op >= 0) & (op <= 2), f_op, 1.0).view(4, n, 1, 1, 1)
        b = torch.where(op == 1, 1 - f_op, 0.0).view(4, n, 1, 1, 1)
        c = torch.where(op == 2, 1 - f_op, 0.0).view(4, n, 1, 1, 1)
        if on_host:
            blend_steps = ((op >= 0) & (op <= 2)).any(dim=1).tolist()
            hue_steps = ((op == 3) & (hue != 0)).any(dim=1).tolist() if rgb else [False] * 4
        else:
            blend_steps, hue_steps = [True] * 4, [rgb] * 4
        for step in range(4):
            if blend_steps[step]:
                gray = _gray(x)  # [n, 1, H, W]
                mix = torch.addcmul(b[step] * gray.mean(dim=(1, 2, 3), keepdim=True), x, a[step])
                if rgb:
                    mix = mix.addcmul_(c[step], gray)
                x = mix.clamp_(0.0, 1.0)
            if hue_steps[step] and on_host:
                idx = ((op[step] == 3) & (hue != 0)).nonzero().flatten()
                x = x.index_copy(0, idx, _shift_hue(x.index_select(0, idx), hue.index_select(0, idx)))
            elif hue_steps[step]:
                x = torch.where(((op[step] == 3) & (hue != 0)).view(n, 1, 1, 1), _shift_hue(x, hue), x)
        return x

    def _blur(self, x: torch.Tensor, apply: torch.Tensor, u_sigma: torch.Tensor) -> torch.Tensor:
        """Gaussian blur (sigma ~ U(blur_sigma)) on the crops where ``apply`` [n] is True."""
        size = x.shape[-1]
        k = self.blur_kernel_size or blur_kernel_size(size)
        lo, hi = self.blur_sigma
        if not _may_sync(x):  # blur every crop and keep the chosen ones
            mat = _blur_matrices(lo + u_sigma * (hi - lo), size, k)[:, None]  # [n, 1, size, size]
            return torch.where(apply.view(-1, 1, 1, 1), mat @ x @ mat.transpose(-1, -2), x)
        idx = apply.nonzero().flatten()
        if idx.numel() == 0:
            return x
        sigma = lo + u_sigma.index_select(0, idx) * (hi - lo)  # [m]
        mat = _blur_matrices(sigma, size, k)[:, None]  # [m, 1, size, size]
        blurred = mat @ x.index_select(0, idx) @ mat.transpose(-1, -2)  # [m, C, size, size]
        return x.index_copy(0, idx, blurred)

    # ---------------------------------------------------------------------------------------- call

    def __call__(
        self, img: Image.Image | torch.Tensor | np.ndarray, generator: torch.Generator | None = None
    ) -> dict[str, list[torch.Tensor]]:
        # Crops are tiny: with several intra-op threads (num_workers=0, in the training process) OpenMP
        # hand-offs make each small op 10-30x slower on busy cores, so run single-threaded and restore.
        threads = torch.get_num_threads()
        if threads == 1:
            return self._augment(img, generator)
        torch.set_num_threads(1)
        try:
            return self._augment(img, generator)
        finally:
            torch.set_num_threads(threads)

    def _augment(
        self, img: Image.Image | torch.Tensor | np.ndarray, generator: torch.Generator | None
    ) -> dict[str, list[torch.Tensor]]:
        x = _to_float_chw(img, self.channels)  # [C, H, W]
        g, g_u = self._crop_group(
            x, 2, self.global_crops_size, self.global_crops_scale, self._global_blur_p, self._global_sol_p,
            generator,
        )  # [2, C, S, S], [2, 14]
        n = self.local_crops_number
        loc, loc_u = self._crop_group(
            x, n, self.local_crops_size, self.local_crops_scale,
            torch.full((n,), self.blur_p[2]), torch.full((n,), self.solarize_p[2]), generator,
        ) if n > 0 else (g[:0], g_u[:0])  # [n, C, s, s], [n, 14]
        out: dict[str, list[torch.Tensor]] = {}
        if self.photometric_on_device:  # the draws travel with the crops; the device finishes them
            out = {"global_photometric": list(g_u.unbind(0)), "local_photometric": list(loc_u.unbind(0))}
        else:
            g, loc = self.photometric(g, g_u), (self.photometric(loc, loc_u) if n > 0 else loc)
        globals_ = list(g.unbind(0))
        return {
            "global_crops": globals_,
            "global_crops_teacher": list(globals_),  # DINOv2: the teacher sees the same two global views
            "local_crops": list(loc.unbind(0)),
            **out,
        }

    def finish_batch(self, batch: dict) -> dict:
        """The photometric half over a collated batch already on its device (``photometric_on_device``):
        global crops [2B, C, S, S] with ``global_photometric`` [2B, 14], local crops likewise."""
        out = dict(batch)
        g_u, loc_u = out.pop("global_photometric", None), out.pop("local_photometric", None)
        if g_u is None or batch["global_crops"] is None:
            return out
        g = self.photometric(batch["global_crops"], g_u)
        shared = batch["global_crops_teacher"] is batch["global_crops"]
        out["global_crops"] = g
        out["global_crops_teacher"] = g if shared else self.photometric(batch["global_crops_teacher"], g_u)
        if batch.get("local_crops") is not None:
            out["local_crops"] = self.photometric(batch["local_crops"], loc_u)
        return out

    def __repr__(self) -> str:
        return (
            f"MultiCropAugmentation(global={self.global_crops_size}px x2 scale={self.global_crops_scale}, "
            f"local={self.local_crops_size}px x{self.local_crops_number} scale={self.local_crops_scale}, "
            f"channels={self.channels})"
        )
