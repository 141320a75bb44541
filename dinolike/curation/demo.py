"""A Fashion-MNIST pool with known near-duplicates and evaluation leaks, to try and test the pipeline.

Writes `out/pool/` (PNG originals from the train split, injected copies of some of them: JPEG re-encoded,
shifted by one pixel or brightened; copies of test-split images, which relative dedup must catch; one
corrupt file), `out/seeds/<class>/` (train images of a few classes, not in the pool) and `out/truth.json`.

Fashion-MNIST itself holds pairs of near-identical images, within the train split and across train and
test. Such an image's removal would be right, so it cannot serve as an "original that must survive":
originals are drawn only among train images whose nearest neighbour (train candidates and the whole test
split) is clearly farther than any injected copy, measured independently of the pipeline's embedder
(mean absolute pixel difference after fitting a brightness gain, minimised over shifts of up to one pixel).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from PIL import Image, ImageEnhance

from dinolike.data.datasets import FashionMNIST

__all__ = ["COPY_KINDS", "shift_image", "make_copy", "pixel_distance", "write_demo_pool"]

COPY_KINDS = ("jpeg", "shift", "bright")
SHIFTS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def shift_image(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate [H, W] by (dy, dx) pixels, filling with black (no wrap-around)."""
    out = np.zeros_like(a)
    h, w = a.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = (
        a[..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)])
    return out


def make_copy(a: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A near-duplicate of the uint8 image `a` and the file suffix to save it with."""
    img = Image.fromarray(a)
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(60, 91)))
        return Image.open(io.BytesIO(buf.getvalue())), ".jpg"
    if kind == "shift":  # the object stays in frame: only a direction whose vanishing edge line is empty
        edges = {(0, 1): a[:, -1], (0, -1): a[:, 0], (1, 0): a[-1], (-1, 0): a[0]}
        free = [d for d, line in edges.items() if not line.any()]
        if not free:
            raise ValueError("no 1-px shift keeps this image whole")
        dy, dx = free[int(rng.integers(len(free)))]
        return Image.fromarray(shift_image(a, dy, dx)), ".png"
    if kind == "bright":
        return ImageEnhance.Brightness(img).enhance(float(rng.uniform(1.1, 1.3))), ".png"
    raise ValueError(f"copy kind must be one of {COPY_KINDS}, got {kind!r}")


def pixel_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean |a - s * b| / 255 with the brightness gain s fitted by least squares, minimised over shifts of b
    by <= 1 px: [P] for image pairs [P, H, W]."""
    af, best = a.astype(np.float32), None
    for dy, dx in SHIFTS:
        bf = shift_image(b, dy, dx).astype(np.float32)
        energy = np.maximum((bf * bf).sum(axis=(-2, -1), keepdims=True), 1.0)
        gain = (af * bf).sum(axis=(-2, -1), keepdims=True) / energy
        d = np.abs(af - gain * bf).mean(axis=(-2, -1)) / 255.0
        best = d if best is None else np.minimum(best, d)
    return best


def _kind_for(a: np.ndarray, c: int) -> str:
    """Copy kinds in turn; an image touching all four borders cannot be shifted whole, so it is re-encoded."""
    kind = COPY_KINDS[c % len(COPY_KINDS)]
    touches_all = all(line.any() for line in (a[:, 0], a[:, -1], a[0], a[-1]))
    return "jpeg" if kind == "shift" and touches_all else kind


def _nearest_distance(queries: np.ndarray, database: np.ndarray, k: int, exclude_self: bool) -> np.ndarray:
    """Smallest pixel_distance from each query to `database` [M, H, W], over its k candidate neighbours
    (candidates: nearest by 2x2-pooled, norm-scaled pixels)."""
    def feat(x: np.ndarray) -> np.ndarray:
        f = x.astype(np.float32).reshape(len(x), 14, 2, 14, 2).mean(axis=(2, 4)).reshape(len(x), -1)
        f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-6)  # brightness-free candidates
        return np.ascontiguousarray(f, dtype=np.float32)

    index = faiss.IndexFlatL2(196)
    index.add(feat(database))
    best = np.full(len(queries), np.inf, np.float32)
    _, ids = index.search(feat(queries), k + int(exclude_self))  # [Q, k]; pooling tolerates 1-px shifts
    for j in range(ids.shape[1]):
        cand = ids[:, j]
        d = pixel_distance(queries, database[cand])
        if exclude_self:
            d = np.where(cand == np.arange(len(queries)), np.inf, d)
        best = np.minimum(best, d)
    return best


def write_demo_pool(
    out: str | Path, n_originals: int = 3000, n_copies: int = 300, n_test_copies: int = 50,
    seed_classes: tuple[int, ...] = (5, 7, 9), seeds_per_class: int = 30, margin: float = 0.045, seed: int = 0,
) -> dict[str, Any]:
    """Write the demo pool; returns (and saves as truth.json) what every file is.

    `margin`: an original's nearest other image (train candidates, test split) must be at pixel_distance
    >= margin; injected copies lie well below it (checked, the largest one is recorded in truth.json).
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    train, test = FashionMNIST(split="train"), FashionMNIST(split="test")
    cand = rng.choice(len(train), int(n_originals * 1.6) + len(seed_classes) * seeds_per_class, replace=False)
    imgs = train.images[cand]
    clear = (_nearest_distance(imgs, imgs, 4, True) >= margin) & (_nearest_distance(imgs, test.images, 4, False)
                                                                   >= margin)
    ok = cand[clear]
    if len(ok) < n_originals:
        raise ValueError(f"only {len(ok)} clearly distinct candidates for {n_originals} originals; lower margin")
    originals = ok[:n_originals]
    rest = np.setdiff1d(cand, originals)  # seeds come from train images outside the pool
    files: dict[str, dict[str, Any]] = {}
    (out / "pool").mkdir(parents=True, exist_ok=True)
    for g, i in enumerate(originals):
        name = f"pool/orig_{g:05d}.png"
        Image.fromarray(train.images[i]).save(out / name)
        files[name] = {"kind": "original", "group": g, "label": int(train.labels[i]), "source": f"train#{i}"}
    copy_dist = []
    for c, g in enumerate(rng.choice(n_originals, n_copies, replace=False)):
        kind = _kind_for(train.images[originals[g]], c)
        img, suffix = make_copy(train.images[originals[g]], kind, rng)
        name = f"pool/copy_{c:05d}_{kind}{suffix}"
        img.save(out / name)
        copy_dist.append(float(pixel_distance(train.images[originals[g]][None], np.asarray(img)[None])[0]))
        files[name] = {"kind": "copy", "copy": kind, "group": int(g), "label": int(train.labels[originals[g]])}
    for c, t in enumerate(rng.choice(len(test), n_test_copies, replace=False)):
        kind = _kind_for(test.images[t], c)
        img, suffix = make_copy(test.images[t], kind, rng)
        name = f"pool/testcopy_{c:05d}_{kind}{suffix}"
        img.save(out / name)
        files[name] = {"kind": "test_copy", "copy": kind, "label": int(test.labels[t]), "source": f"test#{t}"}
    (out / "pool" / "corrupt_00000.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 200, np.uint8)))
    files["pool/corrupt_00000.png"] = {"kind": "corrupt", "label": -1}
    for c in seed_classes:
        d = out / "seeds" / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(rest[train.labels[rest] == c][:seeds_per_class]):
            Image.fromarray(train.images[i]).save(d / f"seed_{j:03d}.png")
    truth = {
        "files": files, "seed_classes": list(seed_classes), "margin": margin,
        "max_copy_distance": max(copy_dist) if copy_dist else 0.0,
        "counts": {"originals": n_originals, "copies": n_copies, "test_copies": n_test_copies, "corrupt": 1,
                   "candidates_rejected_as_natural_duplicates": int((~clear).sum()),
                   "seeds": len(seed_classes) * seeds_per_class},
    }
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth
