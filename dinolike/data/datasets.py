"""Image datasets: Fashion-MNIST straight from its IDX files, image folders, and path manifests.

Every dataset returns ``(image, label)`` pairs. Fashion-MNIST images are always valid; folder and manifest
images are read lazily from disk, so a corrupt or vanished file yields ``(None, label)`` plus a warning
naming the file instead of killing a multi-hour run (the SSL collate counts and drops these).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .images import _IMAGE_READ_ERRORS, DataError, load_image, read_image

__all__ = [
    "DataError",
    "FashionMNIST",
    "ImageFolder",
    "Manifest",
    "IMAGE_EXTENSIONS",
    "DATASET_SCHEMES",
    "build_dataset",
    "check_readable",
    "load_image",
    "parse_spec",
    "read_image",
]

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FMNIST_INSTALL_HINT = "install it with `apt-get install -y dataset-fashion-mnist`"
FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dims
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dim

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
DATASET_SCHEMES = ("fmnist", "folder", "folder-nolabels", "manifest", "shards")
# every spec form, for the help of each option that takes one
DATASET_SPEC_HELP = (
    "fmnist:train | fmnist:test | folder:DIR (labels from sub-folders) | folder-nolabels:DIR | "
    "manifest:FILE (path[<TAB>label] per line) | shards:DIR (written by `dinolike shard`)"
)

# ----------------------------------------------------------------------------------------------- IDX


def _read_idx(path: Path, magic: int, item_shape: tuple[int, ...], limit: int | None) -> np.ndarray:
    """Decode a gzipped IDX file into a uint8 array [N, *item_shape].

    With ``limit`` only the first ``limit`` items are decompressed (fast test subsets); without it the
    whole payload is read and its length must match the header exactly (catches truncation/padding).
    """
    if not path.is_file():
        raise DataError(f"Fashion-MNIST file not found: {path}; {FMNIST_INSTALL_HINT}")
    ndim = 1 + len(item_shape)
    try:
        with gzip.open(path, "rb") as f:
            header = f.read(4 + 4 * ndim)
            if len(header) < 4 + 4 * ndim:
                raise DataError(f"{path}: truncated IDX header; {FMNIST_INSTALL_HINT}")
            got_magic, *dims = struct.unpack(f">I{ndim}I", header)
            if got_magic != magic:
                raise DataError(
                    f"{path}: bad IDX magic number 0x{got_magic:08x} (expected 0x{magic:08x}); "
                    f"the file is corrupt or of the wrong kind; {FMNIST_INSTALL_HINT}"
                )
            if tuple(dims[1:]) != item_shape:
                raise DataError(f"{path}: item shape {tuple(dims[1:])} != expected {item_shape}")
            n_total = dims[0]
            n = n_total if limit is None else min(limit, n_total)
            item_bytes = int(np.prod(item_shape, dtype=np.int64))
            payload = f.read(n * item_bytes)
            if len(payload) != n * item_bytes:
                raise DataError(
                    f"{path}: truncated payload ({len(payload)} bytes, expected {n * item_bytes}); "
                    f"{FMNIST_INSTALL_HINT}"
                )
            if n == n_total and f.read(1):
                raise DataError(f"{path}: trailing bytes after {n_total} items; the file is corrupt")
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot decompress ({e}); {FMNIST_INSTALL_HINT}") from e
    return np.frombuffer(payload, dtype=np.uint8).reshape(n, *item_shape)


class FashionMNIST:
    """Fashion-MNIST (60k train / 10k test, 28x28 grayscale, 10 classes) read from the raw IDX files.

    Attributes: ``images`` uint8 [N, 28, 28], ``labels`` int64 [N], ``num_classes`` (10), ``classes``.
    ``channels=3`` returns RGB images (gray replicated) for models that expect 3 channels.
    """

    # every image is in memory once the files are read: a batch is never empty, so distributed training
    # need not agree on empty batches every step (one collective less: BENCHMARKS.md section 6c)
    always_readable = True

    def __init__(
        self,
        root: str | os.PathLike = FMNIST_ROOT,
        split: str = "train",
        limit: int | None = None,
        channels: int = 1,
    ) -> None:
        if split not in _FMNIST_FILES:
            raise ValueError(f"Fashion-MNIST split must be one of {sorted(_FMNIST_FILES)}, got {split!r}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"Fashion-MNIST folder not found: {self.root}; {FMNIST_INSTALL_HINT}")
        img_file, lbl_file = _FMNIST_FILES[split]
        self.split = split
        self.channels = channels
        self.images: np.ndarray = _read_idx(self.root / img_file, _IDX_IMAGES_MAGIC, (28, 28), limit)
        labels = _read_idx(self.root / lbl_file, _IDX_LABELS_MAGIC, (), limit)
        self.labels: np.ndarray = labels.astype(np.int64)
        if len(self.images) != len(self.labels):
            raise DataError(
                f"{self.root}: {img_file} has {len(self.images)} images but {lbl_file} has "
                f"{len(self.labels)} labels"
            )
        if len(self.labels) and int(self.labels.max()) >= len(FMNIST_CLASSES):
            raise DataError(f"{self.root / lbl_file}: label {int(self.labels.max())} out of range 0..9")
        self.classes = list(FMNIST_CLASSES)
        self.num_classes = len(FMNIST_CLASSES)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        img = Image.fromarray(self.images[i])  # mode "L" for a 2-D uint8 array
        if self.channels == 3:
            img = img.convert("RGB")
        return img, int(self.labels[i])

    def __repr__(self) -> str:
        return f"FashionMNIST(split={self.split!r}, n={len(self)}, root={str(self.root)!r})"


# ------------------------------------------------------------------------------------- files on disk


def check_readable(paths: Sequence[str], what: str, channels: int = 3, max_probes: int = 1000, seed: int = 0) -> None:
    """Raise DataError, naming a few files and why, when no image of ``paths`` can be decoded.

    Files are probed in a seeded random order and the probe stops at the first good one (usually one
    decode). ``max_probes`` bad files in a row out of a random sample mean far more than any tolerable
    share of the data is unreadable, so a big dataset need not be scanned to the end."""
    order = np.random.default_rng(seed).permutation(len(paths))[:max_probes]
    errors = []
    for i in order:
        try:
            read_image(paths[i], channels)
            return
        except _IMAGE_READ_ERRORS as e:
            if len(errors) < 3:
                errors.append(f"{paths[i]} ({type(e).__name__}: {e})")
    probed = "" if len(order) == len(paths) else f"{len(order)} randomly probed of "
    raise DataError(f"{what}: none of {probed}its {len(paths)} image files can be read, e.g. {'; '.join(errors)}")


class _FileDataset:
    """Shared behaviour of datasets that hold a list of image paths and integer labels."""

    paths: list[str]
    labels: np.ndarray
    channels: int

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image | None, int]:
        return load_image(self.paths[i], self.channels), int(self.labels[i])

    def _finish(self, paths: Sequence[str], labels: Sequence[int], limit: int | None, channels: int) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if limit is not None:
            paths, labels = paths[:limit], labels[:limit]
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.channels = channels


class ImageFolder(_FileDataset):
    """All images under ``root`` (recursive, sorted by relative path, so the order is deterministic).

    With ``labels=True`` the label is the index of the image's first-level sub-folder among the sorted
    first-level sub-folders that contain images; images lying directly in ``root`` get label -1.
    With ``labels=False`` every label is -1 (unlabelled pretraining data).
    """

    def __init__(
        self, root: str | os.PathLike, labels: bool = True, channels: int = 3, limit: int | None = None
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root}")
        rel_paths: list[str] = []
        seen_dirs: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen_dirs:  # symlink cycle (or a folder linked twice): scan it once
                dirnames[:] = []
                continue
            seen_dirs.add(real)
            dirnames.sort()
            for name in filenames:
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    rel_paths.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        rel_paths.sort(key=lambda p: Path(p).parts)
        if not rel_paths:
            raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}")
        tops = [Path(p).parts[0] if len(Path(p).parts) > 1 else None for p in rel_paths]
        if labels:
            self.classes = sorted({t for t in tops if t is not None})
            index = {c: k for k, c in enumerate(self.classes)}
            lbls = [index[t] if t is not None else -1 for t in tops]
        else:
            self.classes = []
            lbls = [-1] * len(rel_paths)
        self.num_classes = len(self.classes)
        self._finish([str(self.root / p) for p in rel_paths], lbls, limit, channels)

    def __repr__(self) -> str:
        return f"ImageFolder(root={str(self.root)!r}, n={len(self)}, classes={self.num_classes})"


class Manifest(_FileDataset):
    """Images listed in a text file: ``path`` or ``path<TAB>label`` per line.

    Relative paths are resolved against the manifest's own folder (so a dataset directory with its list
    can be moved as a unit); blank lines and lines starting with ``#`` are ignored. Missing labels are -1.
    """

    def __init__(self, path: str | os.PathLike, channels: int = 3, limit: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"manifest file not found: {self.path}")
        base = self.path.resolve().parent
        paths: list[str] = []
        lbls: list[int] = []
        with open(self.path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, start=1):
                line = raw.rstrip("\r\n")
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                fields = line.split("\t")
                if len(fields) > 2:
                    raise DataError(f"{self.path}:{lineno}: expected 'path' or 'path<TAB>label': {line!r}")
                p = Path(fields[0].strip())
                label = -1
                if len(fields) == 2 and fields[1].strip():
                    try:
                        label = int(fields[1].strip())
                    except ValueError:
                        raise DataError(
                            f"{self.path}:{lineno}: label {fields[1].strip()!r} is not an integer"
                        ) from None
                paths.append(str(p if p.is_absolute() else base / p))
                lbls.append(label)
        if not paths:
            raise DataError(f"manifest {self.path} lists no images")
        known = sorted({x for x in lbls if x >= 0})
        self.num_classes = (known[-1] + 1) if known else 0
        self._finish(paths, lbls, limit, channels)

    def __repr__(self) -> str:
        return f"Manifest(path={str(self.path)!r}, n={len(self)})"


# -------------------------------------------------------------------------------------------- specs


def parse_spec(spec: str) -> tuple[str, str]:
    """``scheme:rest`` of a dataset spec, checked without touching the disk (so configs can be validated
    before a job is submitted to machines that may see other files). Raises ValueError."""
    scheme, sep, rest = str(spec).partition(":")
    if scheme not in DATASET_SCHEMES or not sep:
        raise ValueError(
            f"unknown dataset spec {spec!r}; valid forms: fmnist:train, fmnist:test, fmnist:<split>:<root>, "
            f"folder:<path>, folder-nolabels:<path>, manifest:<file>, shards:<dir> "
            f"(schemes: {', '.join(DATASET_SCHEMES)})"
        )
    if scheme == "fmnist":
        split = rest.partition(":")[0]
        if split not in _FMNIST_FILES:
            raise ValueError(f"dataset spec {spec!r}: Fashion-MNIST split must be one of {sorted(_FMNIST_FILES)}")
    elif not rest:
        raise ValueError(f"dataset spec {spec!r} is missing a path after '{scheme}:'")
    return scheme, rest


def as_spec(data: str | os.PathLike) -> str:
    """A dataset spec from what a Python caller passes: a spec as it is (`folder:DIR`, `fmnist:train`),
    a shard folder (with index.json) as `shards:DIR`, any other existing folder as `folder:DIR` (labels
    from its first-level sub-folders, -1 for images directly in it) and an existing file as
    `manifest:FILE`. Checked like any spec (ValueError)."""
    path = Path(os.fspath(data)).expanduser()
    if path.is_dir() and (path / "index.json").is_file():  # written by `dinolike shard`
        return f"shards:{path.absolute()}"
    if path.is_dir():
        return f"folder:{path.absolute()}"
    if path.is_file():
        return f"manifest:{path.absolute()}"
    scheme = str(data).partition(":")[0]
    if scheme not in DATASET_SCHEMES and (os.sep in str(data) or str(data).startswith((".", "~"))):
        raise ValueError(f"folder or file not found: {data}")  # a path, not a misspelt spec
    parse_spec(str(data))
    return str(data)


def first_image(spec: str) -> tuple[str, str, tuple[int, int]] | None:
    """(path, PIL mode, (width, height)) of the first image file of a folder or manifest spec, read from
    its header only; None for Fashion-MNIST, a bad spec or an unreadable first file."""
    try:
        scheme, _ = parse_spec(spec)
        if scheme in ("fmnist", "shards"):
            return None
        path = build_dataset(spec).paths[0]
        with Image.open(path) as img:
            return path, img.mode, img.size
    except (DataError, *_IMAGE_READ_ERRORS):
        return None


def build_dataset(spec: str, channels: int | None = None, limit: int | None = None, shard_window: int = 16):
    """Build a dataset from a config string.

    Specs: ``fmnist:train``, ``fmnist:test``, ``fmnist:train:/custom/root``, ``folder:/path``,
    ``folder-nolabels:/path``, ``manifest:/path/list.txt``, ``shards:/dir``. ``channels`` defaults to 1
    for Fashion-MNIST and 3 for files on disk; ``shard_window`` is the shards mixed per block (shards.py).
    """
    scheme, rest = parse_spec(spec)
    if scheme == "shards":
        from .shards import ShardDataset

        return ShardDataset(rest, channels=channels or 3, limit=limit, window=shard_window)
    if scheme == "fmnist":
        split, _, root = rest.partition(":")
        return FashionMNIST(root or FMNIST_ROOT, split=split, limit=limit, channels=channels or 1)
    if scheme == "manifest":
        return Manifest(rest, channels=channels or 3, limit=limit)
    return ImageFolder(rest, labels=(scheme == "folder"), channels=channels or 3, limit=limit)
