"""Feature extraction: fast path == PIL path, counted skips, cache identity, distributed gathering."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from testkit import free_port

from dinolike.data.normalize import build_eval_transform
from dinolike.eval.feature_cache import cache_key, cached_features
from dinolike.eval.features import FeatureSet, extract_features

MEAN, STD = (0.2860,), (0.3530,)


class _GrayDataset:
    """Small in-memory dataset in the build_dataset interface; `broken` items decode to None."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, broken: tuple[int, ...] = (), expose=True):
        if expose:
            self.images = images
        self._images, self.labels, self.broken = images, labels, set(broken)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if i in self.broken:
            return None, int(self.labels[i])
        return Image.fromarray(self._images[i]), int(self.labels[i])


def _data(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)


def _model() -> torch.nn.Module:
    from dinolike.models import build_backbone

    torch.manual_seed(0)
    cfg = {"arch": "vit_pico", "patch_size": 7, "img_size": 28, "in_chans": 1, "layerscale": 1.0}
    return build_backbone(cfg, drop_path=False).eval()


def _extract(model, ds, **kw) -> FeatureSet:
    args = dict(channels=1, mean=MEAN, std=STD, resolution=28, resize=28, batch_size=16, progress=False)
    args.update(kw)
    return extract_features(model, ds, build_eval_transform(28, 28, MEAN, STD), **args)


def test_tensor_fast_path_equals_pil_transform_path() -> None:
    imgs, labels = _data()
    model = _model()
    fast = _extract(model, _GrayDataset(imgs, labels))
    slow = _extract(model, _GrayDataset(imgs, labels, expose=False))
    assert torch.allclose(fast.cls, slow.cls, atol=1e-5)
    assert torch.equal(fast.labels, slow.labels)
    assert fast.cls.shape == (40, 4, 96) and fast.patch_mean.shape == (40, 96)
    # the last stored CLS token is what the model's forward() returns
    x = (torch.from_numpy(imgs[:4]).float() / 255 - MEAN[0]) / STD[0]
    with torch.no_grad():
        assert torch.allclose(fast.knn_features()[:4], model(x.unsqueeze(1)), atol=1e-5)


def test_pixel_features_and_undecodable_items_are_counted() -> None:
    imgs, labels = _data()
    feats = _extract(None, _GrayDataset(imgs, labels, broken=(3, 17), expose=False))
    assert feats.skipped == 2 and len(feats) == 38
    keep = [i for i in range(40) if i not in (3, 17)]
    assert torch.equal(feats.labels, torch.as_tensor(labels[keep]))
    expected = (torch.from_numpy(imgs[keep]).float() / 255 - MEAN[0]) / STD[0]
    assert torch.allclose(feats.cls[:, 0], expected.flatten(1), atol=1e-6)
    assert feats.patch_mean is None


def test_model_mode_is_restored() -> None:
    imgs, labels = _data(8)
    model = _model().train()
    _extract(model, _GrayDataset(imgs, labels))
    assert model.training


def test_cache_reuses_and_invalidates(tmp_path) -> None:
    calls = []

    def compute() -> FeatureSet:
        calls.append(1)
        return FeatureSet(torch.randn(5, 1, 3), None, torch.arange(5))

    ckpt = tmp_path / "a.pth"
    ckpt.write_bytes(b"x")
    from dinolike.eval.feature_cache import path_fingerprint

    key = {"file": path_fingerprint(str(ckpt)), "spec": "fmnist:test"}
    a, hit_a = cached_features(tmp_path / "c", key, compute)
    b, hit_b = cached_features(tmp_path / "c", key, compute)
    assert (hit_a, hit_b) == (False, True) and len(calls) == 1 and torch.equal(a.cls, b.cls)
    os.utime(ckpt, ns=(1, 1))  # a rewritten checkpoint must not hit the old features
    key2 = {"file": path_fingerprint(str(ckpt)), "spec": "fmnist:test"}
    assert cache_key(key2) != cache_key(key)
    _, hit_c = cached_features(tmp_path / "c", key2, compute)
    assert not hit_c and len(calls) == 2
    # a truncated cache file is recomputed, not trusted
    path = tmp_path / "c" / f"{cache_key(key2)}.pt"
    path.write_bytes(path.read_bytes()[:20])
    _, hit_d = cached_features(tmp_path / "c", key2, compute)
    assert not hit_d and len(calls) == 3


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        imgs, labels = _data(37)  # not divisible by the world size
        feats = _extract(_model(), _GrayDataset(imgs, labels, broken=(4,), expose=False), batch_size=8)
        torch.save(feats.to_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_shards_gather_to_the_single_process_result(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    imgs, labels = _data(37)
    ref = _extract(_model(), _GrayDataset(imgs, labels, broken=(4,), expose=False), batch_size=8)
    for r in range(2):
        got = FeatureSet.from_dict(torch.load(tmp_path / f"rank{r}.pt", weights_only=True))
        assert got.skipped == 1 and len(got) == 36
        assert torch.equal(got.labels, ref.labels)
        assert torch.allclose(got.cls, ref.cls, atol=1e-5)
        assert torch.allclose(got.patch_mean, ref.patch_mean, atol=1e-5)


def test_linear_input_layout() -> None:
    cls = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    fs = FeatureSet(cls, torch.full((2, 3), -1.0), torch.tensor([0, 1]))
    x = fs.linear_input(2, avgpool=True)
    assert x.shape == (2, 9)
    assert torch.equal(x[0], torch.tensor([6.0, 7, 8, 9, 10, 11, -1, -1, -1]))
    with pytest.raises(ValueError, match="only 4 stored"):
        fs.linear_input(5, avgpool=False)


def test_knn_features_cls_plus_patches_averages_the_two_cosines() -> None:
    """"cls+patches": the cosine of two rows is the mean of their CLS and patch-mean cosines, whatever
    the scale of either part; raw pixels (no patch tokens) and unknown kinds are clear errors."""
    from dinolike.eval.features import FeatureError

    g = torch.Generator().manual_seed(0)
    cls = torch.randn(6, 2, 5, generator=g)  # [N, L, D]
    patches = 30.0 * torch.randn(6, 5, generator=g)  # a much larger scale than the CLS tokens
    fs = FeatureSet(cls, patches, torch.zeros(6, dtype=torch.long))
    assert torch.equal(fs.knn_features(), cls[:, -1])
    x = torch.nn.functional.normalize(fs.knn_features("cls+patches"), dim=1)  # [N, 2D]
    assert x.shape == (6, 10)
    cos = torch.nn.functional.cosine_similarity
    for i, j in ((0, 1), (2, 5), (3, 4)):
        want = 0.5 * (cos(cls[i, -1], cls[j, -1], dim=0) + cos(patches[i], patches[j], dim=0))
        assert torch.allclose(x[i] @ x[j], want, atol=1e-6)
    with pytest.raises(FeatureError, match="raw pixels"):
        FeatureSet(cls, None, fs.labels).knn_features("cls+patches")
    with pytest.raises(FeatureError, match=re.escape("eval.knn.features='patches': one of cls | cls+patches")):
        fs.knn_features("patches")
