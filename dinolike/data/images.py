"""Decoding one image file (or the bytes of a shard member): the errors that mean "unusable", 8-bit
conversion of deep images, and the skip-and-warn policy every dataset shares."""

from __future__ import annotations

import os
import warnings
import zlib
from typing import IO

import numpy as np
from PIL import Image

from dinolike.errors import DinolikeError

__all__ = ["DataError", "load_image", "read_image"]

# PIL raises a zoo of exception types on bad files; all of them mean "this file is unusable".
_IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, zlib.error)


class DataError(DinolikeError, RuntimeError):
    """A dataset file is missing, truncated or not what its name claims."""


def _to_8bit(img: Image.Image) -> Image.Image:
    """Deep images (16-bit PNG/TIFF: modes I;16*, I; float: F) scaled to 8 bits. PIL's own convert()
    clips them at 255 instead of scaling, so a 16-bit image would train as almost white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, dtype=np.float64).clip(0, 65535) / 257.0  # [H, W] in 0..255
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a  # [0, 1] floats, else 0..255 already
        a = np.nan_to_num(a).clip(0, 255)
    else:
        return img
    return Image.fromarray(np.rint(a).astype(np.uint8), mode="L")


def read_image(path: str | os.PathLike | IO[bytes], channels: int = 3) -> Image.Image:
    """Fully decode an image as RGB (``channels=3``) or L (``channels=1``); raises on an unusable file.

    Decoding happens here, so truncation surfaces now and not later inside a transform; an image above
    PIL's pixel limit (a decompression bomb, or a header claiming 20000x20000) is refused before any
    pixel memory is allocated: PIL itself only warns below twice its limit.
    """
    with Image.open(path) as img:  # reads the header only
        limit = Image.MAX_IMAGE_PIXELS
        if limit and img.width * img.height > limit:
            raise Image.DecompressionBombError(f"{img.width}x{img.height} pixels is above the limit of {limit}")
        img.load()
        return _to_8bit(img).convert("L" if channels == 1 else "RGB")


def load_image(path: str | os.PathLike, channels: int = 3) -> Image.Image | None:
    """`read_image`, or None + a warning naming the file when it is unreadable (the caller counts it)."""
    try:
        return read_image(path, channels)
    except _IMAGE_READ_ERRORS as e:
        warnings.warn(f"skipping unreadable image {os.fspath(path)}: {type(e).__name__}: {e}", stacklevel=2)
        return None
