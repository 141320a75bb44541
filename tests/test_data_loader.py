"""Position-indexed SSL loading: collate layout, determinism across workers, resume, ranks, RNG isolation."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dinolike.data import (
    FashionMNIST,
    MaskSampler,
    MultiCropAugmentation,
    PositionBatchSampler,
    PositionSampler,
    SSLDataset,
    build_ssl_loader,
    collate_ssl,
)

needs_fmnist = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="apt-get install -y dataset-fashion-mnist"
)


@pytest.fixture(scope="module")
def ssl_dataset() -> SSLDataset:
    base = FashionMNIST(limit=24)  # small: 8-sample batches cross epoch boundaries quickly
    aug = MultiCropAugmentation(28, 12, local_crops_number=2, channels=1)
    return SSLDataset(base, aug, seed=123, mask_fn=MaskSampler((7, 7), mask_probability=0.5))


def _batches(loader, n: int) -> list[dict]:
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    del it
    return out


def _assert_same_batch(a: dict, b: dict) -> None:
    assert a["batch_size"] == b["batch_size"] and a["skipped"] == b["skipped"]
    for key in ("global_crops", "local_crops", "masks", "mask_indices", "masks_weight", "labels", "positions"):
        assert torch.equal(a[key], b[key]), key


def test_position_sampler_ranks_partition_global_batches() -> None:
    single = PositionBatchSampler(PositionSampler(start=40), batch_size=6)
    ranks = [PositionBatchSampler(PositionSampler(start=40, rank=r, world_size=2), batch_size=3) for r in (0, 1)]
    for one, r0, r1 in itertools.islice(zip(single, *ranks, strict=False), 5):
        assert sorted(r0 + r1) == one
        assert not set(r0) & set(r1)
    first = next(iter(single))
    assert first == list(range(40, 46))
    with pytest.raises(ValueError):
        PositionSampler(rank=2, world_size=2)


@needs_fmnist
def test_epochs_are_permutations_seeded_by_epoch(ssl_dataset: SSLDataset) -> None:
    n = len(ssl_dataset)
    epoch0 = [ssl_dataset.locate(g)[1] for g in range(n)]
    epoch1 = [ssl_dataset.locate(g)[1] for g in range(n, 2 * n)]
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1 and epoch0 != list(range(n))
    assert ssl_dataset.locate(2 * n + 5)[0] == 2


@needs_fmnist
def test_sample_depends_only_on_seed_epoch_index(ssl_dataset: SSLDataset) -> None:
    torch.manual_seed(0)
    a = ssl_dataset[30]
    torch.manual_seed(999)  # the global RNG must not matter
    ssl_dataset.permutation(5)  # nor the cached epoch
    b = ssl_dataset[30]
    assert a["index"] == b["index"] and a["epoch"] == 1
    for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"], strict=True):
        assert torch.equal(x, y)
    assert torch.equal(a["masks"], b["masks"]) and a["masks"].shape == (2, 49)
    # Same index in another epoch: different augmentation.
    g_other = next(g for g in range(48, 72) if ssl_dataset.locate(g)[1] == a["index"])
    c = ssl_dataset[g_other]
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])


def test_collate_layout_and_mask_weights() -> None:
    samples = []
    for i in range(3):
        masks = torch.zeros(2, 4, dtype=torch.bool)
        masks[0, : i + 1] = True  # crop 0 of image i masks i+1 tokens, crop 1 masks none
        g = [torch.full((1, 2, 2), 10.0 * i + k) for k in range(2)]
        samples.append({
            "global_crops": g, "global_crops_teacher": g,
            "local_crops": [torch.full((1, 1, 1), 100.0 * i + k) for k in range(3)],
            "masks": masks, "label": i, "index": i, "position": 7 + i, "ok": True,
        })
    samples.insert(1, {"label": 9, "index": 9, "position": 99, "ok": False})
    b = collate_ssl(samples)
    assert b["batch_size"] == 3 and b["skipped"] == 1
    # Crop-major: all images' crop 0, then all images' crop 1.
    assert b["global_crops"][:, 0, 0, 0].tolist() == [0, 10, 20, 1, 11, 21]
    assert b["global_crops_teacher"] is b["global_crops"]
    assert b["local_crops"][:, 0, 0, 0].tolist() == [0, 100, 200, 1, 101, 201, 2, 102, 202]
    assert b["masks"].shape == (6, 4)
    assert b["mask_indices"].tolist() == [0, 4, 5, 8, 9, 10]
    assert b["n_masked"] == 6
    torch.testing.assert_close(b["masks_weight"], torch.tensor([1, 1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3]))
    assert b["labels"].tolist() == [0, 1, 2] and b["positions"].tolist() == [7, 8, 9]
    none = collate_ssl([{"label": 0, "ok": False}] * 2)
    assert none["batch_size"] == 0 and none["skipped"] == 2


@needs_fmnist
def test_worker_count_does_not_change_batches(ssl_dataset: SSLDataset) -> None:
    serial = _batches(build_ssl_loader(ssl_dataset, 8, start_position=0, num_workers=0), 4)
    parallel = _batches(build_ssl_loader(ssl_dataset, 8, start_position=0, num_workers=2, prefetch_factor=2), 4)
    for a, b in zip(serial, parallel, strict=True):
        _assert_same_batch(a, b)
    assert serial[0]["global_crops"].shape == (16, 1, 28, 28)
    assert serial[0]["local_crops"].shape == (16, 1, 12, 12)
    assert serial[3]["positions"].tolist() == list(range(24, 32))  # epoch 1 already


@needs_fmnist
def test_resume_at_position_replays_the_uninterrupted_run(ssl_dataset: SSLDataset) -> None:
    full = _batches(build_ssl_loader(ssl_dataset, 8, start_position=0), 6)
    resumed = _batches(build_ssl_loader(ssl_dataset, 8, start_position=4 * 8), 2)
    _assert_same_batch(full[4], resumed[0])
    _assert_same_batch(full[5], resumed[1])
    # Resuming on two ranks with the same global batch (2 x 4) yields the same samples, split by rank.
    ranks = [_batches(build_ssl_loader(ssl_dataset, 4, 4 * 8, rank=r, world_size=2), 1)[0] for r in (0, 1)]
    by_position = {}
    for rb in ranks:
        n = rb["batch_size"]
        for i, pos in enumerate(rb["positions"].tolist()):
            by_position[pos] = (rb["global_crops"][i], rb["global_crops"][n + i], rb["masks"][i])
    assert sorted(by_position) == full[4]["positions"].tolist()
    for i, pos in enumerate(full[4]["positions"].tolist()):
        g0, g1, m0 = by_position[pos]
        assert torch.equal(g0, full[4]["global_crops"][i]) and torch.equal(g1, full[4]["global_crops"][8 + i])
        assert torch.equal(m0, full[4]["masks"][i])


@needs_fmnist
def test_loader_leaves_caller_rng_untouched(ssl_dataset: SSLDataset) -> None:
    torch.manual_seed(42)
    random.seed(42)
    np.random.seed(42)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(42)
    random.seed(42)
    np.random.seed(42)
    _batches(build_ssl_loader(ssl_dataset, 8, start_position=5), 2)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


@needs_fmnist
def test_plain_transform_runs_seeded_and_restores_global_rng() -> None:
    base = FashionMNIST(limit=10)

    def noisy(img) -> dict:  # a transform that uses the global RNGs
        t = torch.from_numpy(np.array(img)).float()[None] + torch.rand(1) + random.random()
        return {"global_crops": [t, t], "global_crops_teacher": [t, t], "local_crops": []}

    ds = SSLDataset(base, noisy, seed=1)
    state = torch.get_rng_state()
    py_state = random.getstate()
    a, b = ds[3], ds[3]
    assert torch.equal(a["global_crops"][0], b["global_crops"][0])
    assert torch.equal(torch.get_rng_state(), state) and random.getstate() == py_state
    assert a["masks"] is None
    batch = collate_ssl([a, b])
    assert batch["masks"] is None and batch["n_masked"] == 0 and batch["local_crops"] is None


def test_augment_on_device_gives_the_step_the_same_batches() -> None:
    """`data.augment_on_device`: the loader ships crops + draws and the batch mover finishes them; the
    step sees the batches of the one-piece loader (same seeds, same positions)."""
    from dinolike.config import load_config
    from dinolike.dist import DistEnv
    from dinolike.training.data import build_batch_mover, build_train_loader

    config = Path(__file__).resolve().parent.parent / "configs" / "fmnist_cpu.yaml"
    base = ["data.batch_size=4", "data.num_workers=0", "data.limit=32", "run.progress=false"]
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    got = {}
    for on in (False, True):
        cfg = load_config(config, [*base, f"data.augment_on_device={str(on).lower()}"])
        move = build_batch_mover(cfg, env.device)
        loader = iter(build_train_loader(cfg, env, start_position=8))
        got[on] = [move(next(loader)) for _ in range(2)]
    for ref, dev in zip(got[False], got[True], strict=True):
        assert set(dev) == set(ref)  # the draws do not reach the step
        for key in ("global_crops", "global_crops_teacher", "local_crops", "masks", "indices"):
            torch.testing.assert_close(dev[key], ref[key], rtol=1e-5, atol=1e-5, msg=key)
