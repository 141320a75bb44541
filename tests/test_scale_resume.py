"""Training as at scale, in small: `shards:` data, FSDP2 on 2 CPU processes, sharded DCP checkpoints.

- kill -9 in the middle of a DCP save (every rank's shards written, the manifest not yet), then resume on 2
  processes: the half-written folder is ignored and removed, the run goes on from the previous checkpoint
  and ends exactly where the uninterrupted run ends (same losses, bit-identical teacher);
- a DCP checkpoint of 2 processes resumes in 1 (2 -> 1 world size), equal to rounding (test_distributed.py
  explains the tolerances), and the one process writes the single file;
- a corrupt image inside a shard is a counted skip on the way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_distributed import COMMON, assert_losses_match, assert_models_match
from testkit import REPO, SMOKE, rows

from dinolike.checkpoints import dcp
from dinolike.checkpoints import files as ck
from dinolike.data.datasets import FashionMNIST
from dinolike.data.shard_writer import ShardConfig, write_shards
from dinolike.data.shards import ShardDataset, sidecar_name

DRIVER = REPO / "tests" / "fault_driver.py"
GLOBAL_BATCH, SEED = 16, 0
RUN = [a for a in COMMON if not a.startswith("eval.")]  # 4 iterations, checkpoints at 2 and 4


def launch(out: Path, shards: Path, nproc: int, *extra: str, kill: str | None = None) -> subprocess.CompletedProcess:
    train = ["--config", str(SMOKE), f"run.output_dir={out}", f"data.train=shards:{shards}", f"run.seed={SEED}",
             f"data.batch_size={GLOBAL_BATCH // nproc}", f"dist.strategy={'fsdp' if nproc > 1 else 'none'}",
             *RUN, *extra]
    args = [str(DRIVER), *(["--kill", kill] if kill else []), "--", *train]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        env.pop(k, None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def ok(p: subprocess.CompletedProcess) -> str:
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-6000:]
    return log


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 Fashion-MNIST images in 4 shards, one image drawn in the first batch overwritten with garbage."""
    src = tmp_path_factory.mktemp("imgs")
    for i, img in enumerate(FashionMNIST(limit=256).images):
        Image.fromarray(img).save(src / f"{i:03d}.png")
    out = tmp_path_factory.mktemp("shards")
    write_shards(ShardConfig(source=str(src), out=str(out), shard_size=64))
    ds = ShardDataset(out)
    victim = ds.order(0, SEED)[5]  # global position 5: drawn at iteration 1
    shard, member = ds.locate(victim)
    side = np.load(out / sidecar_name(ds.shards[shard]))  # [n, 3]: offset, size, label
    offset, size = int(side[member, 0]), int(side[member, 1])
    with open(out / ds.shards[shard], "r+b") as f:
        f.seek(offset)
        f.write(b"\x00" * size)
    return out


@pytest.fixture(scope="module")
def reference(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    ok(launch(out, shards, 2))
    return out


def teacher(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        return dcp.read_full_model(path, ("teacher",))["teacher"]
    return ck.load_checkpoint(path)["model"]["teacher"]


def test_kill_9_during_a_dcp_save_then_resume_on_2_processes_is_exact(shards, reference, tmp_path) -> None:
    ref_ckpts = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert ref_ckpts == ["ckpt_0000002", "ckpt_0000004"]  # FSDP: sharded folders, one file per rank
    names = {p.name for p in (reference / "checkpoints" / "ckpt_0000004").iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt", "manifest.json"} <= names
    ref_rows = rows(reference)
    assert ref_rows[0]["skipped_files"] == 1  # the corrupt member, counted (and named in the log)

    out = tmp_path / "killed"
    killed = launch(out, shards, 2, kill="dcp-mid@4")
    assert killed.returncode != 0
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert left == [".ckpt_0000004.tmp", "ckpt_0000002"], left  # the half-written save never took a real name
    log = ok(launch(out, shards, 2))
    assert "resumed from" in log and "at iteration 2" in log
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt_0000002", "ckpt_0000004"]
    got = list({r["iteration"]: r for r in rows(out) if r["iteration"] > 2}.values())  # the resumed run's rows
    want = [r for r in ref_rows if r["iteration"] > 2]  # (the killed run had logged 3 and 4 before its save)
    keys = [k for k in want[0] if k.endswith("loss")]
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in want]  # exact, not close
    a, b = teacher(out / "checkpoints" / "ckpt_0000004"), teacher(reference / "checkpoints" / "ckpt_0000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_dcp_checkpoint_of_2_processes_resumes_in_1(shards, reference, tmp_path) -> None:
    out = tmp_path / "one"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "ckpt_0000002", out / "checkpoints" / "ckpt_0000002")
    log = ok(launch(out, shards, 1))
    assert "resumed from" in log and "at iteration 2" in log
    got = rows(out)
    assert [r["iteration"] for r in got] == [3, 4]
    assert_losses_match(got, rows(reference))
    final = ck.list_checkpoints(out / "checkpoints")[-1]
    assert final.name == "ckpt_0000004.pt"  # one process: the single file
    ref = {"model": {p: dcp.read_full_model(reference / "checkpoints" / "ckpt_0000004")[p]
                     for p in ("student", "teacher")}}
    assert_models_match(ck.load_checkpoint(final), ref)
