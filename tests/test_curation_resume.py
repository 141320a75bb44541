"""A killed `embed` resumes: complete shards are kept as they are, the rest equal a clean run's shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from faultlog import record
from PIL import Image

from dinolike.commands.curate import main
from dinolike.data.datasets import FashionMNIST

ROOT = Path(__file__).resolve().parent.parent
N, SHARD = 1600, 100


def _embed_cmd(work: Path, pool: Path) -> list[str]:
    return [sys.executable, "-m", "curation", "embed", "--config", str(ROOT / "configs/curation/fmnist_demo.yaml"),
            f"work_dir={work}", f"pool=[folder-nolabels:{pool}]", "references=[]", "seeds=[]",
            f"embed.shard_size={SHARD}", "embed.batch_size=4", "embed.progress=false"]


def _shards(work: Path) -> list[tuple[np.ndarray, str]]:
    d = work / "embeddings" / "pool"
    return [(np.load(d / f"shard_{i:05d}.npy"), (d / f"shard_{i:05d}.paths.txt").read_text())
            for i in range(N // SHARD)]


def test_killed_embed_resumes_to_identical_shards(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    for i, a in enumerate(FashionMNIST(split="train", limit=N).images):
        Image.fromarray(a).save(pool / f"{i:05d}.png")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    assert main(_embed_cmd(clean, pool)[3:]) == 0  # the clean reference run, in-process

    proc = subprocess.Popen(_embed_cmd(crashed, pool), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    markers = crashed / "embeddings" / "pool"
    deadline = time.monotonic() + 240
    while not (markers / "shard_00000.done.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "embed ended before its first shard"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(markers.glob("shard_*.done.json"))
    assert 1 <= len(done) < N // SHARD, f"{len(done)} shards complete at the kill: nothing left to resume"
    mtimes = {p: p.with_name(p.name.replace(".done.json", ".npy")).stat().st_mtime_ns for p in done}

    assert main(_embed_cmd(crashed, pool)[3:]) == 0  # the rerun resumes
    for p, t in mtimes.items():  # complete shards were not recomputed
        assert p.with_name(p.name.replace(".done.json", ".npy")).stat().st_mtime_ns == t
    for (a, pa), (b, pb) in zip(_shards(clean), _shards(crashed), strict=True):
        assert pa == pb
        np.testing.assert_array_equal(a, b)
    record("embed-killed", f"killed with {len(done)} of {N // SHARD} shards complete; those kept, the rest "
                           "recomputed, equal to a clean run")
