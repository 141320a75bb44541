"""Datasets: Fashion-MNIST IDX reader, image folders, manifests, dataset specs, corrupt-file handling."""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinolike.data import (
    DataError,
    FashionMNIST,
    ImageFolder,
    Manifest,
    MultiCropAugmentation,
    SSLDataset,
    build_dataset,
    collate_ssl,
)

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(), reason="apt-get install -y dataset-fashion-mnist")


def _decode_idx(path: Path) -> np.ndarray:
    """Independent IDX decode: whole file, header fields read with int.from_bytes."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@needs_fmnist
def test_fmnist_test_split_matches_independent_decode() -> None:
    ds = FashionMNIST(split="test")
    ref_images = _decode_idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    ref_labels = _decode_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")
    assert ds.images.shape == (10000, 28, 28) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.images, ref_images)
    np.testing.assert_array_equal(ds.labels, ref_labels)
    assert ds.num_classes == 10 and len(ds) == 10000
    # The Fashion-MNIST test set is balanced: 1000 images per class.
    np.testing.assert_array_equal(np.bincount(ds.labels, minlength=10), np.full(10, 1000))
    img, label = ds[1234]
    assert img.mode == "L" and img.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(img), ref_images[1234])
    assert label == int(ref_labels[1234])


@needs_fmnist
def test_fmnist_limit_reads_prefix_and_rgb_option() -> None:
    ds = FashionMNIST(split="train", limit=300, channels=3)
    full_labels = _decode_idx(FMNIST / "train-labels-idx1-ubyte.gz")
    assert len(ds) == 300 and ds.images.shape == (300, 28, 28)
    np.testing.assert_array_equal(ds.labels, full_labels[:300])
    img, _ = ds[7]
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (28, 28, 3)
    np.testing.assert_array_equal(arr[..., 0], ds.images[7])
    np.testing.assert_array_equal(arr[..., 2], ds.images[7])


def _write_idx(path: Path, magic_dims: bytes, payload: bytes) -> None:
    path.write_bytes(gzip.compress(magic_dims + payload, compresslevel=1))


def test_fmnist_synthetic_files_and_corruption_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        FashionMNIST(root=tmp_path / "nowhere")
    images = np.arange(5 * 28 * 28, dtype=np.int64).reshape(5, 28, 28) % 251
    img_path, lbl_path = tmp_path / "t10k-images-idx3-ubyte.gz", tmp_path / "t10k-labels-idx1-ubyte.gz"
    img_header = bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    lbl_header = bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big")
    _write_idx(img_path, img_header, images.astype(np.uint8).tobytes())
    _write_idx(lbl_path, lbl_header, bytes([3, 1, 4, 1, 5]))
    ds = FashionMNIST(root=tmp_path, split="test")
    np.testing.assert_array_equal(ds.images, images.astype(np.uint8))
    assert ds.labels.tolist() == [3, 1, 4, 1, 5]
    # Wrong magic number (a label header on the image file).
    _write_idx(img_path, bytes([0, 0, 8, 1]) + img_header[4:], images.astype(np.uint8).tobytes())
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz.*magic"):
        FashionMNIST(root=tmp_path, split="test")
    # Truncated payload.
    _write_idx(img_path, img_header, images.astype(np.uint8).tobytes()[:1000])
    with pytest.raises(DataError, match="truncated"):
        FashionMNIST(root=tmp_path, split="test")
    # Not gzip at all.
    img_path.write_bytes(b"definitely not gzip" * 10)
    with pytest.raises(DataError, match="decompress"):
        FashionMNIST(root=tmp_path, split="test")
    # Label count disagrees with image count.
    _write_idx(img_path, img_header, images.astype(np.uint8).tobytes())
    _write_idx(lbl_path, bytes([0, 0, 8, 1]) + (4).to_bytes(4, "big"), bytes([3, 1, 4, 1]))
    with pytest.raises(DataError, match="5 images but"):
        FashionMNIST(root=tmp_path, split="test")
    # Missing label file.
    os.remove(lbl_path)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        FashionMNIST(root=tmp_path, split="test")
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(split="valid")


def _write_png(path: Path, value: int, mode: str = "RGB", size: tuple[int, int] = (20, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=value if mode == "L" else (value, 255 - value, 7)).save(path)


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    _write_png(root / "cats" / "b.png", 10)
    _write_png(root / "cats" / "deep" / "a.jpg", 20)
    _write_png(root / "ants" / "z.bmp", 30)
    _write_png(root / "ants" / "x.png", 40)
    (root / "ants" / "x.png").write_bytes(b"\x89PNG garbage, not an image")  # corrupt file
    (root / "ants" / "notes.txt").write_text("not an image")
    _write_png(root / "dogs" / "c.webp", 50, mode="L")
    (root / "empty").mkdir()
    return root


def test_image_folder_scan_labels_and_corrupt_file(image_tree: Path) -> None:
    ds = ImageFolder(image_tree)
    rel = [str(Path(p).relative_to(image_tree)) for p in ds.paths]
    assert rel == ["ants/x.png", "ants/z.bmp", "cats/b.png", "cats/deep/a.jpg", "dogs/c.webp"]
    assert ds.classes == ["ants", "cats", "dogs"]  # "empty" holds no image: no phantom class
    assert ds.labels.tolist() == [0, 0, 1, 1, 2]
    img, label = ds[2]
    assert img.mode == "RGB" and img.size == (20, 16) and label == 1
    assert np.asarray(img)[0, 0].tolist() == [10, 245, 7]
    gray, _ = ImageFolder(image_tree, channels=1)[4]
    assert gray.mode == "L" and np.asarray(gray)[0, 0] == 50
    with pytest.warns(UserWarning, match=r"ants/x\.png"):
        bad, bad_label = ds[0]
    assert bad is None and bad_label == 0
    unlabeled = build_dataset(f"folder-nolabels:{image_tree}")
    assert unlabeled.labels.tolist() == [-1] * 5 and len(unlabeled) == 5


def test_corrupt_image_is_counted_and_dropped_by_collate(image_tree: Path) -> None:
    ds = ImageFolder(image_tree)
    aug = MultiCropAugmentation(16, 8, local_crops_number=2)
    ssl = SSLDataset(ds, aug, seed=3, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = [ssl[g] for g in range(len(ds))]
    assert [s["ok"] for s in samples] == [False, True, True, True, True]
    batch = collate_ssl(samples)
    assert batch["skipped"] == 1 and batch["batch_size"] == 4
    assert batch["global_crops"].shape == (8, 3, 16, 16)
    assert batch["labels"].tolist() == [0, 1, 1, 2]
    empty = collate_ssl(samples[:1])
    assert empty["batch_size"] == 0 and empty["skipped"] == 1 and empty["global_crops"] is None


def test_manifest_relative_paths_labels_and_comments(image_tree: Path, tmp_path: Path) -> None:
    lists = image_tree / "lists"
    lists.mkdir()
    absolute = image_tree / "dogs" / "c.webp"
    (lists / "train.txt").write_text(
        "# header comment\n"
        "../cats/b.png\t4\n"
        "\n"
        f"{absolute}\n"
        "  # indented comment\n"
        "../ants/z.bmp\t0\n"
    )
    ds = build_dataset(f"manifest:{lists / 'train.txt'}", channels=1)
    assert isinstance(ds, Manifest)
    assert [Path(p).resolve() for p in ds.paths] == [
        (image_tree / "cats" / "b.png").resolve(), absolute.resolve(), (image_tree / "ants" / "z.bmp").resolve()
    ]
    assert ds.labels.tolist() == [4, -1, 0]
    img, label = ds[0]
    assert img.mode == "L" and label == 4
    (lists / "bad.txt").write_text("../cats/b.png\tcat\n")
    with pytest.raises(DataError, match=r"bad\.txt:1.*'cat'"):
        Manifest(lists / "bad.txt")
    (lists / "gone.txt").write_text("missing.png\t1\n")
    with pytest.warns(UserWarning, match=r"missing\.png"):
        assert Manifest(lists / "gone.txt")[0] == (None, 1)
    with pytest.raises(DataError, match="not found"):
        Manifest(lists / "nope.txt")


@needs_fmnist
def test_build_dataset_specs(tmp_path: Path) -> None:
    test = build_dataset("fmnist:test", limit=50)
    assert isinstance(test, FashionMNIST) and test.split == "test" and len(test) == 50
    custom = build_dataset(f"fmnist:train:{FMNIST}", limit=5, channels=3)
    assert custom.split == "train" and custom[0][0].mode == "RGB"
    with pytest.raises(ValueError, match="fmnist.*folder.*folder-nolabels.*manifest"):
        build_dataset("imagenet:/data")
    with pytest.raises(ValueError, match="missing a path"):
        build_dataset("folder:")
    with pytest.raises(DataError, match="no image files"):
        build_dataset(f"folder:{tmp_path}")

