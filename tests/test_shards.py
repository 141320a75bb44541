"""The `shards:DIR` data scheme on real images: writing (folder, manifest, curation output, parallel parts),
reading back pixel for pixel, the per-epoch order without per-item lists, and every bad-input case
(corrupt member, truncated / missing / vanished shard) as a counted skip or a one-line error."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinolike.commands import shard as shard_cmd
from dinolike.data.collate import collate_ssl
from dinolike.data.datasets import DataError, FashionMNIST, build_dataset
from dinolike.data.positions import SSLDataset
from dinolike.data.shard_order import BlockOrder, FeistelPermutation
from dinolike.data.shard_writer import ShardConfig, merge_index, write_shards
from dinolike.data.shards import ShardDataset, sidecar_name

N, SHARD = 120, 32  # 121 files, one broken: 4 shards of 32, 31 (the broken file left out), 32, 25


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fashion-MNIST as PNGs in 3 class sub-folders, plus one file that is not an image."""
    root = tmp_path_factory.mktemp("imgs")
    fm = FashionMNIST(limit=N)
    for c in range(3):
        (root / f"c{c}").mkdir()
    for i in range(N):
        Image.fromarray(fm.images[i]).save(root / f"c{i % 3}" / f"{i:03d}.png")
    (root / "c0" / "zzz_broken.png").write_bytes(b"not a png at all")
    return root


@pytest.fixture(scope="module")
def shards(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(ShardConfig(source=f"folder:{folder}", out=str(out), shard_size=SHARD))
    return out


def test_written_shards_are_standard_tars_with_a_wids_index_and_read_back_pixel_for_pixel(folder, shards):
    index = json.loads((shards / "index.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1"  # wids.ShardListDataset reads it as it is
    assert [s["nsamples"] for s in index["shardlist"]] == [32, 31, 32, 25]
    assert index["dinolike"]["left_out_unreadable"] == 1  # the broken file: counted, not stored
    with tarfile.open(shards / "shard-000000.tar") as tf:  # the standard library reads every member
        names = tf.getnames()
    assert names[:2] == ["000000000.cls", "000000000.png"] and len(names) == 64
    ref = build_dataset(f"folder:{folder}")
    good = [i for i, p in enumerate(ref.paths) if "broken" not in p]
    ds = build_dataset(f"shards:{shards}")
    assert len(ds) == N and ds.num_classes == 3
    for k in (0, 31, 32, 77, N - 1):
        img, label = ds[k]
        want, want_label = ref[good[k]]
        assert label == want_label
        np.testing.assert_array_equal(np.asarray(img), np.asarray(want))


def test_manifest_curation_output_and_parallel_parts_write_the_same_items(folder, shards, tmp_path):
    ref = build_dataset(f"folder:{folder}")
    work = tmp_path / "curated"  # what `curate build` leaves: manifest.txt with a header line
    work.mkdir()
    keep = [(p, lbl) for p, lbl in zip(ref.paths, ref.labels, strict=True) if "broken" not in p][::2]
    (work / "manifest.txt").write_text("# curated\n" + "".join(f"{p}\t{lbl}\n" for p, lbl in keep))
    assert shard_cmd.main(["curation:" + str(work), "--out", str(tmp_path / "c"), "--shard-size", "16"]) == 0
    cur = ShardDataset(tmp_path / "c")
    assert len(cur) == len(keep) and [cur[i][1] for i in range(5)] == [int(lbl) for _, lbl in keep[:5]]
    for part in range(3):
        assert shard_cmd.main([f"folder:{folder}", "--out", str(tmp_path / "p"), "--shard-size", str(SHARD),
                               "--part", str(part), "--parts", "3"]) == 0
    assert not (tmp_path / "p" / "index.json").exists()  # not complete before the merge
    merge_index(tmp_path / "p", 3)
    par, one = ShardDataset(tmp_path / "p"), ShardDataset(shards)
    assert len(par) == len(one) and [par[i][1] for i in range(N)] == [one[i][1] for i in range(N)]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 100, 1000])
def test_feistel_is_a_bijection(n: int) -> None:
    perm = FeistelPermutation(n, key=12345)
    assert sorted(perm(i) for i in range(n)) == list(range(n))


@pytest.mark.parametrize("window", [1, 3, 100])
def test_each_epoch_is_a_permutation_reshuffled_per_epoch_without_per_item_lists(window: int) -> None:
    counts = np.array([50, 7, 50, 50, 1, 50, 33], dtype=np.int64)  # uneven shards, 241 items
    orders = [BlockOrder(counts, seed=3, epoch=e, window=window) for e in range(3)]
    seqs = [[o[i] for i in range(len(o))] for o in orders]
    for s in seqs:
        assert sorted(s) == list(range(241))
    assert seqs[0] != seqs[1] != seqs[2]
    assert seqs[0] == [BlockOrder(counts, 3, 0, window)[i] for i in range(241)]  # deterministic
    for o in orders:  # memory: nothing per item, only per shard
        sizes = [np.size(v) for v in vars(o).values() if isinstance(v, np.ndarray | list)]
        assert max(sizes) <= len(counts) + 1
    if window == 1:  # a block is one shard: consecutive offsets stay in it (locality on network storage)
        starts = np.concatenate([[0], np.cumsum(counts)])
        shard_of = np.searchsorted(starts, seqs[0][:50], side="right") - 1
        assert len(set(shard_of.tolist())) == 1
    assert [BlockOrder(counts, 3, 0, window, shuffle=False)[i] for i in range(5)] == [0, 1, 2, 3, 4]


def test_positions_on_ranks_and_workers_are_disjoint_and_cover_the_epoch(shards) -> None:
    ds = SSLDataset(ShardDataset(shards), transform=lambda img: {}, seed=0)
    world, workers = 3, 2  # any split of the positions of one epoch reads each item exactly once
    stride = world * workers
    seen = [ds.locate(p)[1] for r in range(world) for w in range(workers) for p in range(r + world * w, N, stride)]
    assert sorted(seen) == list(range(N))
    assert not isinstance(ds.permutation(0), list)


def _member_offset(root: Path, shard: str, member: int) -> tuple[int, int]:
    side = np.load(root / sidecar_name(shard))
    return int(side[member, 0]), int(side[member, 1])


def copy_shards(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_a_corrupt_member_is_a_counted_skip_naming_the_shard(shards, tmp_path) -> None:
    root = copy_shards(shards, tmp_path / "s")
    off, size = _member_offset(root, "shard-000001.tar", 5)
    with open(root / "shard-000001.tar", "r+b") as f:  # garbage over the PNG, same size: the tar stays valid
        f.seek(off)
        f.write(b"\xff" * size)
    ds = ShardDataset(root)
    with pytest.warns(UserWarning, match=r"shard-000001\.tar member 5"):
        img, label = ds[SHARD + 5]
    assert img is None and label >= 0
    ssl = SSLDataset(ds, transform=lambda img: {"global_crops": [], "global_crops_teacher": [], "local_crops": []},
                     seed=0, shuffle=False)
    with pytest.warns(UserWarning):
        batch = collate_ssl([ssl[p] for p in range(SHARD, 2 * SHARD)])
    assert batch["skipped"] == 1 and batch["skipped_indices"] == [SHARD + 5] and batch["batch_size"] == SHARD - 1


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_truncated_shard_is_a_one_line_error_naming_it_at_start(shards, tmp_path, capsys, damage):
    root = copy_shards(shards, tmp_path / "s")
    tar = root / "shard-000002.tar"
    if damage == "missing":
        tar.unlink()
    else:
        tar.write_bytes(tar.read_bytes()[:-700])
    with pytest.raises(DataError, match=r"shard .*shard-000002\.tar is " + damage):
        build_dataset(f"shards:{root}")
    # the same through training's validation path: one line, no traceback (train command checks data)
    from dinolike.commands import train as cli

    status = cli.main(["train", "--config", "configs/fmnist_smoke.yaml", f"data.train=shards:{root}",
                       f"run.output_dir={tmp_path / 'run'}", "run.device=cpu"])
    err = capsys.readouterr().err
    assert status != 0 and "shard-000002.tar" in err and "Traceback" not in err, err


def test_a_shard_that_vanishes_mid_run_is_a_counted_skip_not_a_hang(shards, tmp_path) -> None:
    root = copy_shards(shards, tmp_path / "s")
    ds = ShardDataset(root)  # start-up check passes
    (root / "shard-000003.tar").unlink()
    with pytest.warns(UserWarning, match=r"skipping unreadable shard .*shard-000003\.tar"):
        assert ds[int(ds.cum[2])] == (None, -1)
    assert ds[0][0] is not None  # the others still read


def test_bad_sources_and_indexes_are_one_line_errors(tmp_path, capsys) -> None:
    assert shard_cmd.main(["fmnist:train", "--out", str(tmp_path / "x")]) == 2
    assert "shards are written from image files" in capsys.readouterr().err
    assert shard_cmd.main(["curation:" + str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no manifest.txt" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.json").write_text("{}")
    with pytest.raises(DataError, match="not a shard index"):
        ShardDataset(tmp_path / "bad")
    with pytest.raises(DataError, match="shard index not found"):
        ShardDataset(tmp_path / "nothing")


def test_a_shard_folder_passed_as_a_path_is_read_as_shards(shards) -> None:
    from dinolike.data.datasets import as_spec

    assert as_spec(shards) == f"shards:{shards.absolute()}"  # the Python API's `data=` takes the folder as it is
