"""Multi-crop augmentation: shapes, exact behaviour of each step against independent references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from dinolike.data import FashionMNIST, MultiCropAugmentation, blur_kernel_size
from dinolike.data.augment_ops import _blur_matrices, _resize_matrices, _shift_hue
from dinolike.data.normalize import FMNIST_MEAN, FMNIST_STD

needs_fmnist = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="apt-get install -y dataset-fashion-mnist"
)

# Every random step switched off: what is left is crop + resize + normalise.
PLAIN = dict(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0))


def _rgb_image(seed: int = 0, size: tuple[int, int] = (50, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def _denorm(t: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return t * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)


@needs_fmnist
def test_shapes_and_statistics_grayscale() -> None:
    ds = FashionMNIST(limit=200)
    aug = MultiCropAugmentation(28, 12, local_crops_number=3, channels=1)
    gen = torch.Generator().manual_seed(0)
    out = aug(ds[0][0], gen)
    assert [tuple(t.shape) for t in out["global_crops"]] == [(1, 28, 28)] * 2
    assert [tuple(t.shape) for t in out["local_crops"]] == [(1, 12, 12)] * 3
    assert all(t.dtype == torch.float32 for t in out["global_crops"] + out["local_crops"])
    assert all(a is b for a, b in zip(out["global_crops"], out["global_crops_teacher"], strict=True))
    crops = torch.stack([aug(ds[i][0], gen)["global_crops"][0] for i in range(200)])  # [200, 1, 28, 28]
    pixels = _denorm(crops, FMNIST_MEAN, FMNIST_STD)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # Normalised with the Fashion-MNIST statistics, crops stay roughly zero-mean / unit-std (crops zoom
    # into the garment, so they are a little brighter than whole images, hence the tolerance).
    assert abs(crops.mean().item()) < 0.5 and 0.6 < crops.std().item() < 1.4


def test_shapes_and_statistics_rgb() -> None:
    aug = MultiCropAugmentation(32, 16, local_crops_number=4, channels=3)
    gen = torch.Generator().manual_seed(1)
    out = aug(_rgb_image(), gen)
    assert [tuple(t.shape) for t in out["global_crops"]] == [(3, 32, 32)] * 2
    assert [tuple(t.shape) for t in out["local_crops"]] == [(3, 16, 16)] * 4
    # A gray input image becomes 3 equal channels when channels=3.
    gray_in = Image.fromarray(np.full((30, 30), 100, dtype=np.uint8))
    plain = MultiCropAugmentation(32, 16, local_crops_number=0, channels=3, mean=(0, 0, 0), std=(1, 1, 1), **PLAIN)
    g = plain(gray_in, gen)["global_crops"][0]
    torch.testing.assert_close(g, torch.full((3, 32, 32), 100 / 255), atol=1e-5, rtol=0)
    # Uniform noise in [0,1] has mean 0.5, std 0.289; after ImageNet normalisation channel 0 has
    # mean (0.5 - 0.485) / 0.229 ~ 0.07 before augmentation, and jitter keeps it within [0, 1].
    big = torch.stack([aug(_rgb_image(s), gen)["global_crops"][0] for s in range(20)])
    assert big.shape == (20, 3, 32, 32)
    assert abs(big[:, 0].mean().item() - 0.07) < 0.6


def test_no_local_crops() -> None:
    aug = MultiCropAugmentation(24, 12, local_crops_number=0, channels=3)
    out = aug(_rgb_image(), torch.Generator().manual_seed(0))
    assert out["local_crops"] == [] and len(out["global_crops"]) == 2


def test_identity_crop_returns_normalised_image() -> None:
    img = _rgb_image(size=(24, 24))
    aug = MultiCropAugmentation(
        24, 8, local_crops_number=1, global_crops_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), **PLAIN
    )
    out = aug(img, torch.Generator().manual_seed(0))
    ref = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    for crop in out["global_crops"]:
        torch.testing.assert_close(_denorm(crop, aug.mean, aug.std), ref, atol=1e-5, rtol=0)


def test_flip_and_solarize_exact() -> None:
    img = _rgb_image(size=(24, 24))
    ref = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    common = dict(PLAIN, global_crops_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), local_crops_number=0)
    flip = MultiCropAugmentation(24, 8, **dict(common, flip_p=1.0))
    crop = flip(img, torch.Generator().manual_seed(0))["global_crops"][1]
    torch.testing.assert_close(_denorm(crop, flip.mean, flip.std), ref.flip(-1), atol=1e-5, rtol=0)
    sol = MultiCropAugmentation(24, 8, **dict(common, solarize_p=(1.0, 1.0, 1.0)))
    crop = sol(img, torch.Generator().manual_seed(0))["global_crops"][0]
    expected = torch.where(ref >= 128 / 255, 1 - ref, ref)
    torch.testing.assert_close(_denorm(crop, sol.mean, sol.std), expected, atol=1e-5, rtol=0)


def test_grayscale_makes_channels_equal_and_one_channel_ignores_colour_ops() -> None:
    gray = MultiCropAugmentation(20, 10, local_crops_number=2, **dict(PLAIN, gray_p=1.0))
    out = gray(_rgb_image(), torch.Generator().manual_seed(0))
    for crop in out["global_crops"] + out["local_crops"]:
        px = _denorm(crop, gray.mean, gray.std)
        torch.testing.assert_close(px[0], px[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(px[1], px[2], atol=1e-5, rtol=0)
    # With one channel, saturation / hue jitter must be exact no-ops.
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    colour_only = dict(PLAIN, jitter_p=1.0, jitter=(0.0, 0.0, 0.9, 0.5), gray_p=1.0, local_crops_number=0)
    a = MultiCropAugmentation(28, 8, channels=1, **colour_only)(img, torch.Generator().manual_seed(5))
    b = MultiCropAugmentation(28, 8, channels=1, **dict(PLAIN, local_crops_number=0))(
        img, torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(a["global_crops"][0], b["global_crops"][0], atol=1e-6, rtol=0)


def test_jitter_changes_pixels_within_range() -> None:
    aug = MultiCropAugmentation(20, 10, local_crops_number=4, **dict(PLAIN, jitter_p=1.0))
    base = MultiCropAugmentation(20, 10, local_crops_number=4, **PLAIN)
    img = _rgb_image()
    a = aug(img, torch.Generator().manual_seed(2))
    b = base(img, torch.Generator().manual_seed(2))  # same draws, so same boxes
    for x, y in zip(a["local_crops"], b["local_crops"], strict=True):
        px = _denorm(x, aug.mean, aug.std)
        assert px.min() >= -1e-5 and px.max() <= 1 + 1e-5
        assert (x - y).abs().max() > 1e-3


def test_resize_matrices_match_torch_interpolate() -> None:
    x = torch.rand(1, 3, 30, 40)
    for top, left, h, w, size in [(3, 4, 20, 25, 28), (0, 0, 30, 40, 12), (5, 7, 6, 9, 16), (10, 2, 13, 31, 13)]:
        ref = F.interpolate(
            x[..., top : top + h, left : left + w], size=(size, size), mode="bicubic", antialias=True,
            align_corners=False,
        )
        rows = _resize_matrices(torch.tensor([top]), torch.tensor([h]), 30, size)
        cols = _resize_matrices(torch.tensor([left]), torch.tensor([w]), 40, size, torch.tensor([True]))
        out = rows[:, None] @ x @ cols[:, None].transpose(-1, -2)
        torch.testing.assert_close(out, ref.flip(-1), atol=1e-5, rtol=0)


def test_blur_matrices_match_reflect_conv() -> None:
    sigma = torch.tensor([0.3, 1.1, 2.0])
    for size in (12, 28, 96):
        k = blur_kernel_size(size)
        x = torch.rand(3, 2, size, size)
        mat = _blur_matrices(sigma, size, k)[:, None]
        out = mat @ x @ mat.transpose(-1, -2)
        for i in range(3):
            ref = TF.gaussian_blur(x[i], [k, k], [sigma[i].item(), sigma[i].item()])  # reflect padding
            torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_hue_shift_matches_torchvision() -> None:
    x = torch.rand(4, 3, 9, 11)
    x[0, :, 0, 0] = 0.5  # a gray pixel (undefined hue) must stay gray
    shifts = torch.tensor([0.1, -0.5, 0.37, 0.0])
    out = _shift_hue(x, shifts)
    for i in range(4):
        torch.testing.assert_close(out[i], TF.adjust_hue(x[i], shifts[i].item()), atol=1e-5, rtol=0)


def test_blur_kernel_size_scales_with_crop() -> None:
    assert [blur_kernel_size(s) for s in (12, 28, 48, 64, 96, 224)] == [3, 3, 5, 7, 9, 9]


def test_same_generator_seed_same_crops() -> None:
    aug = MultiCropAugmentation(20, 10, local_crops_number=3)
    img = _rgb_image()
    a = aug(img, torch.Generator().manual_seed(11))
    b = aug(img, torch.Generator().manual_seed(11))
    c = aug(img, torch.Generator().manual_seed(12))
    for key in ("global_crops", "local_crops"):
        for x, y in zip(a[key], b[key], strict=True):
            assert torch.equal(x, y)
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])


def test_interpolate_path_matches_matrix_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # Large images are resized crop by crop with F.interpolate instead of matrices: same result.
    from dinolike.data import augment

    aug = MultiCropAugmentation(24, 12, local_crops_number=3)
    img = _rgb_image(size=(40, 30))
    fast = aug(img, torch.Generator().manual_seed(4))
    monkeypatch.setattr(augment, "_MATRIX_RESIZE_MAX_PIXELS", 0)
    slow = aug(img, torch.Generator().manual_seed(4))
    for key in ("global_crops", "local_crops"):
        for x, y in zip(fast[key], slow[key], strict=True):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=0)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="channels"):
        MultiCropAugmentation(channels=2)
    with pytest.raises(ValueError, match="mean/std"):
        MultiCropAugmentation(channels=1, mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="blur_kernel_size"):
        MultiCropAugmentation(blur_kernel_size=4)
    with pytest.raises(ValueError, match="crop_ratio"):
        MultiCropAugmentation(crop_ratio=(4 / 3, 3 / 4))


def test_crop_ratio_bounds_the_box_aspect() -> None:
    """crop_ratio=(1, 1) keeps every crop box square; the default range makes non-square boxes too."""
    g = torch.Generator().manual_seed(0)
    square = MultiCropAugmentation(28, 14, crop_ratio=(1.0, 1.0), channels=1)
    boxes = square._boxes(28, 28, 400, (0.2, 1.0), g)
    assert all(h == w for _, _, h, w in boxes)
    wide = MultiCropAugmentation(28, 14, channels=1)
    boxes = wide._boxes(28, 28, 400, (0.2, 1.0), g)
    ratios = [w / h for _, _, h, w in boxes]
    assert any(r != 1 for r in ratios)
    assert all(0.75 - 0.15 <= r <= 4 / 3 + 0.2 for r in ratios)  # rounding to whole pixels widens it a little


@pytest.mark.parametrize("sync_free", [False, True], ids=["cpu-shortcuts", "accelerator-path"])
@pytest.mark.parametrize(("channels", "hw"), [(3, (120, 90)), (1, (28, 28))], ids=["rgb-large", "gray-small"])
def test_photometric_on_device_finishes_to_the_same_crops(monkeypatch, sync_free, channels, hw) -> None:
    """Loader half (crop + resize) + device half (jitter, blur, solarize over the collated batch) gives
    the crops the one-piece augmentation gives for the same seed; the accelerator path (no host reads,
    everything computed and selected) too."""
    from dinolike.data.collate import collate_ssl

    rng = np.random.default_rng(0)
    shape = hw + ((3,) if channels == 3 else ())
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(3)]
    kw = dict(global_crops_size=32 if channels == 3 else 28, local_crops_size=16 if channels == 3 else 14,
              local_crops_number=4, channels=channels, solarize_p=(0.5, 0.5, 0.5), blur_p=(1.0, 0.5, 0.5))
    whole, split = MultiCropAugmentation(**kw), MultiCropAugmentation(**kw, photometric_on_device=True)
    if sync_free:
        monkeypatch.setattr("dinolike.data.augment._may_sync", lambda x: False)

    def batch(aug: MultiCropAugmentation) -> dict:
        samples = [{**aug(img, torch.Generator().manual_seed(i)), "label": 0} for i, img in enumerate(images)]
        return collate_ssl(samples)

    ref, deferred = batch(whole), batch(split)
    assert deferred["global_photometric"].shape == (6, 14) and deferred["local_photometric"].shape == (12, 14)
    assert not torch.allclose(deferred["global_crops"], ref["global_crops"])  # not finished yet
    done = split.finish_batch(deferred)
    assert "global_photometric" not in done and done["global_crops_teacher"] is done["global_crops"]
    for key in ("global_crops", "local_crops"):
        torch.testing.assert_close(done[key], ref[key], rtol=1e-5, atol=1e-5)
