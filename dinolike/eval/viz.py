"""The DINOv2 paper's PCA picture of patch features (`dinolike viz --pretrained CKPT IMAGES...`).

PCA over the patches of all given images jointly; the first component separates foreground from
background (thresholded), a second PCA on the foreground patches gives three components shown as RGB.
Matching colours across images = matching parts, which is the qualitative check of a backbone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, UnidentifiedImageError
from torch import Tensor

log = logging.getLogger(__name__)


def _pca(x: Tensor, k: int) -> Tensor:
    """Project rows of x [M, D] on their first k principal components -> [M, k]."""
    xc = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)  # vh [min(M,D), D]
    comps = vh[:k]  # [k, D]
    out = xc @ comps.T  # [M, k]
    if out.shape[1] < k:  # fewer patches/dims than components: pad with zeros
        out = torch.cat([out, out.new_zeros(out.shape[0], k - out.shape[1])], dim=1)
    return out


def pca_rgb(patches: Tensor, grid: tuple[int, int], threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """Patch features [B, N, D] -> (RGB maps [B, h, w, 3] in [0, 1], foreground masks [B, h, w]).

    Step 1: first principal component over all patches; its sign is fixed so that border patches
    (mostly background) are negative, and patches with pc1 > threshold are foreground.
    Step 2: PCA with 3 components on the foreground patches only, min-max scaled per component to
    [0, 1]; background is black.
    """
    b, n, d = patches.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"{n} patch tokens do not form a {h}x{w} grid")
    flat = patches.reshape(b * n, d).float()  # [B*N, D]
    pc1 = _pca(flat, 1)[:, 0].view(b, h, w)  # [B, h, w]
    border = torch.zeros(h, w, dtype=torch.bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    if pc1[:, border].mean() > 0:
        pc1 = -pc1
    pc1 = pc1 / (pc1.abs().max() + 1e-8)  # threshold is relative to the component's range
    fg = pc1 > threshold  # [B, h, w]
    if int(fg.sum()) < 3:  # degenerate (e.g. uniform images): colour everything rather than nothing
        fg = torch.ones_like(fg)
    rgb = torch.zeros(b, h, w, 3)
    comps = _pca(flat[fg.reshape(-1)], 3)  # [F, 3]
    lo, hi = comps.min(dim=0).values, comps.max(dim=0).values
    rgb[fg] = (comps - lo) / (hi - lo + 1e-8)
    return rgb, fg


def _load_image(path: str, channels: int) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            return im.convert("L" if channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError) as e:
        log.warning("skipping %s: %s", path, e)
        return None


@torch.no_grad()
def pca_figure(
    model: torch.nn.Module,
    images: Sequence[Image.Image],
    *,
    resolution: int,
    mean: Sequence[float],
    std: Sequence[float],
    tile: int = 224,
    threshold: float = 0.0,
    device: str = "cpu",
    names: Sequence[str] | None = None,
) -> Image.Image:
    """Grid PNG: row 1 the (center-cropped) inputs, row 2 their PCA maps; each tile tile x tile pixels,
    labelled with its image's name (and the resolution the model saw) so a shared figure explains itself."""
    from dinolike.data.normalize import build_eval_transform

    p = int(model.patch_size)
    tf = build_eval_transform(resolution, resolution, mean, std)
    x = torch.stack([tf(im) for im in images]).to(device)  # [B, C, H, W]
    model = model.eval().to(device)
    tokens = model.forward_features(x)["x_norm_patchtokens"].float().cpu()  # [B, N, D]
    grid = (resolution // p, resolution // p)
    rgb, _ = pca_rgb(tokens, grid, threshold)  # [B, h, w, 3]
    canvas = Image.new("RGB", (tile * len(images), 2 * tile))
    show = build_eval_transform(resolution, resolution, [0.0] * len(mean), [1.0] * len(std))
    for i, im in enumerate(images):
        inp = show(im)  # [C, H, W] in [0, 1]
        inp = inp.expand(3, -1, -1) if inp.shape[0] == 1 else inp[:3]
        arr = (inp.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        canvas.paste(Image.fromarray(arr).resize((tile, tile), Image.BICUBIC), (i * tile, 0))
        pca = (rgb[i].numpy() * 255).astype(np.uint8)  # [h, w, 3]
        canvas.paste(Image.fromarray(pca).resize((tile, tile), Image.NEAREST), (i * tile, tile))
        name = names[i] if names is not None else f"image {i}"
        _label(canvas, (i * tile, 0), f"{name} ({resolution} px)")
        _label(canvas, (i * tile, tile), f"PCA {name}")
    return canvas


def _label(canvas: Image.Image, xy: tuple[int, int], text: str) -> None:
    """Text on a dark box in a tile's top-left corner (PIL's built-in font: no font files needed)."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(canvas)
    box = draw.textbbox((xy[0] + 2, xy[1] + 1), text)
    draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=(0, 0, 0))
    draw.text((xy[0] + 2, xy[1] + 1), text, fill=(255, 255, 255))


def viz_job(cfg: DictConfig, images: Sequence[str], *, resolution: int | None, tile: int, threshold: float,
            device: str | None) -> tuple[Image.Image, int, int]:
    """(the PCA figure of `images`, how many of them could be read, the resolution the model saw) for the
    backbone `cfg.eval.pretrained` (a config from `dinolike.eval.config.resolve_config`). Raises EvalError."""
    from dinolike.eval.config import EvalError, data_stats
    from dinolike.eval.setup import load_backbone, model_channels

    pretrained = str(cfg.eval.pretrained)
    if pretrained == "pixels":
        raise EvalError("viz needs a model: --pretrained CKPT or random")
    if not images:
        raise EvalError("give at least one image file")
    model, cfg = load_backbone(pretrained, cfg, str(cfg.eval.which), "model" in cfg)
    assert model is not None
    channels = model_channels(model, cfg)
    mean, std = data_stats(cfg, channels)
    loaded = [(Path(p).name, _load_image(p, channels)) for p in images]
    names = [n for n, im in loaded if im is not None]
    imgs = [im for _, im in loaded if im is not None]
    if not imgs:
        raise EvalError("none of the given images could be read")
    p = int(model.patch_size)
    trained = OmegaConf.select(cfg, "crops.global_size") or int(model.pos_embed.shape[1] - 1) ** 0.5 * p
    res = -(-int(resolution or trained) // p) * p
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    fig = pca_figure(model, imgs, resolution=res, mean=mean, std=std, tile=tile, threshold=threshold,
                     device=device, names=names)
    return fig, len(imgs), res
