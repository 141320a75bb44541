"""The on-disk feature cache of the eval commands: one backbone pass per (checkpoint, dataset, transform).

Extraction itself is the library's (`dinolike.eval.features`); this file only names a pass by
everything that determines it and keeps the result, so kNN, linear and logreg of one checkpoint share it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from dinolike.eval.features import FeatureSet, dist_info

log = logging.getLogger(__name__)

# bump when the stored content or its meaning changes, so stale caches are never reused
FEATURE_FORMAT_VERSION = 1


def path_fingerprint(path: str) -> dict[str, Any]:
    """Identity of a file on disk: a changed checkpoint (mtime or size) must never hit an old cache. A
    folder (a run, an HF / timm export) is the identity of every file directly in it: a weight file
    rewritten in place leaves the folder's own mtime as it was."""
    st = os.stat(path)
    fp: dict[str, Any] = {"path": os.path.abspath(path), "mtime_ns": st.st_mtime_ns, "size": st.st_size}
    if os.path.isdir(path):
        with os.scandir(path) as entries:
            fp["files"] = sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in entries if e.is_file())
    return fp


def dataset_fingerprint(spec: str) -> dict[str, Any]:
    """The dataset spec plus, when it names a path, that path's fingerprint (folders change too)."""
    fp: dict[str, Any] = {"spec": spec}
    _, _, rest = spec.partition(":")
    if rest and os.path.exists(rest):
        fp["file"] = path_fingerprint(rest)
    return fp


def cache_key(parts: Mapping[str, Any]) -> str:
    """Stable hash of everything that determines the features."""
    blob = json.dumps({"v": FEATURE_FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cached_features(
    cache_dir: str | Path | None, key_parts: Mapping[str, Any], compute: Callable[[], FeatureSet]
) -> tuple[FeatureSet, bool]:
    """Load features from cache_dir/<key>.pt or compute and store them. Returns (features, was_cached).

    Only rank 0 writes (atomically, via rename); a corrupt cache file is recomputed, not trusted.
    """
    if cache_dir is None:
        return compute(), False
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{cache_key(key_parts)}.pt"
    if path.exists():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return FeatureSet.from_dict(data["features"]), True
        except (OSError, RuntimeError, KeyError, EOFError) as e:
            log.warning("ignoring unreadable feature cache %s (%s); recomputing", path, e)
    feats = compute()
    rank, _ = dist_info()
    if rank == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        meta = json.loads(json.dumps(dict(key_parts), default=str))
        torch.save({"features": feats.to_dict(), "meta": meta}, tmp)
        os.replace(tmp, path)
    return feats, False
