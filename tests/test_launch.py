"""The launcher against a real single-node SLURM cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd).

Skipped (with the reason) unless running as root on Debian with apt access: `launch.cluster` installs
and starts the daemons once for the module and stops them, by pid, at the end.
Real training runs use `dinolike train --config configs/fmnist_smoke.yaml`, shrunk; the protocol
corner cases (admin requeue = SIGTERM, scancel) use the seconds-long stand-in in tests/slurm/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from slurm.cluster import Cluster, ClusterUnavailable, start_cluster

from dinolike.commands import submit as sub

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["--config", "configs/fmnist_smoke.yaml", "data.batch_size=8", "data.limit=64", "optim.epochs=2",
         "run.checkpoint_every=2", "run.log_every=1", "run.progress=false"]  # fmt: skip
STANDIN = "tests.slurm.standin_train:main"


@pytest.fixture(scope="module")
def cluster():
    workdir = Path(tempfile.mkdtemp(prefix="dinolike-slurm-", dir="/tmp"))
    try:
        c = start_cluster(workdir)
    except ClusterUnavailable as e:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.skip(f"no test SLURM cluster: {e}")
    print(f"\nslurm cluster timings: {c.timings}")
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", str(c.conf))  # submitit's sbatch/sacct/scontrol calls go to this cluster
    mp.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    mp.chdir(REPO)
    yield c
    mp.undo()
    try:
        if c.alive():
            c.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _job_field(c: Cluster, job_id: str, key: str) -> str:
    for token in c.run("scontrol", "show", "job", "-o", job_id, check=False).split():
        if token.startswith(f"{key}="):
            return token.split("=", 1)[1]
    return ""


def _wait(cond, timeout: float, what: str, c: Cluster | None = None, job_id: str | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.3)
    info = c.run("scontrol", "show", "job", job_id, check=False) if c and job_id else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{info}")


def _results(job, c: Cluster, timeout: float) -> list:
    _wait(lambda: job.done(), timeout, f"job {job.job_id} to finish", c, job.job_id)
    return job.results()


def _submit(c: Cluster, tmp_path: Path, tasks: int, rest: list[str], entry: str = "dinolike.cli:main"):
    args, rest = sub.parse_args(
        ["train", "--tasks-per-node", str(tasks), "--timeout", "10", "--partition", c.partition,
         "--job-dir", str(tmp_path / "jobs"), "--entry", entry, "--", *rest]
    )  # fmt: skip
    return sub.submit(args, rest)


def _iterations(metrics: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()]


def test_two_task_training_job_completes(cluster, tmp_path):
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "train", "--tasks-per-node", "2", "--timeout", "10",
         "--job-dir", str(tmp_path / "jobs"), "--wait", "--", *SMOKE, "optim.epoch_length=2",
         f"run.output_dir={out}"],
        capture_output=True, text=True, timeout=240, env=cluster.environ(),
    )  # fmt: skip
    print(f"2-task smoke job: {time.monotonic() - t0:.1f}s end to end")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = proc.stdout.split("submitted job ")[1].split(":")[0]
    logs = tmp_path / "jobs" / job_id
    assert "rank 0/2" in (logs / f"{job_id}_0_log.err").read_text()
    assert "rank 1/2" in (logs / f"{job_id}_1_log.err").read_text()
    assert (out / "checkpoints" / "ckpt_0000004.pt").exists()
    assert (out / "teacher_backbone.pth").exists()
    assert _iterations(out / "metrics.jsonl") == [1, 2, 3, 4]
    # the result pickle is written just before the tasks exit: give SLURM a moment to see them end
    _wait(lambda: _job_field(cluster, job_id, "JobState") == "COMPLETED", 30, "COMPLETED", cluster, job_id)


def test_time_limit_signal_checkpoints_requeues_and_resumes(cluster, tmp_path):
    """SIGUSR2 (what SLURM sends signal_delay_s before the time limit) -> save -> requeue -> resume."""
    out = tmp_path / "run"
    total = 300  # long enough that the signal lands mid-run however fast the machine is
    job = _submit(cluster, tmp_path, 1, [*SMOKE, f"optim.epoch_length={total // 2}", f"run.output_dir={out}"])
    _wait(lambda: any((out / "checkpoints").glob("ckpt_*.pt")), 120, "first checkpoint", cluster,
          job.job_id)  # fmt: skip
    t_signal = time.monotonic()
    cluster.run("scancel", "--signal=USR2", job.job_id)
    _wait(lambda: _job_field(cluster, job.job_id, "Restarts") == "1", 60, "the requeue", cluster, job.job_id)
    assert _results(job, cluster, 180) == [0]
    print(f"USR2 -> requeued run finished: {time.monotonic() - t_signal:.1f}s")
    log = job.paths.stderr.read_text()
    assert "requeued job" in log and "resumed from" in log
    resumed_at = int(log.split("resumed from ")[1].split(" at iteration ")[1].split()[0])
    assert 2 <= resumed_at < total  # the stop checkpoint, not the start and not the end
    assert _iterations(out / "metrics.jsonl") == list(range(1, total + 1))  # each iteration exactly once
    assert (out / "checkpoints" / f"ckpt_{total:07d}.pt").exists()
    _wait(lambda: _job_field(cluster, job.job_id, "JobState") == "COMPLETED", 30, "COMPLETED", cluster,
          job.job_id)  # fmt: skip


def test_admin_requeue_resumes_once_and_cancel_is_not_resurrected(cluster, tmp_path):
    """`scontrol requeue` (SIGTERM to the tasks) must not be requeued a second time by the wrapper,
    and `scancel` (also SIGTERM) must leave the job cancelled, not requeue it."""
    out = tmp_path / "standin"
    rest = ["--out", str(out), "--iters", "30", "--ckpt-every", "5", "--step-s", "0.2"]
    job = _submit(cluster, tmp_path, 2, rest, entry=STANDIN)
    _wait(lambda: (out / "ckpt.json").exists(), 60, "first checkpoint", cluster, job.job_id)
    cluster.run("scontrol", "requeue", job.job_id)
    assert _results(job, cluster, 120) == [0, 0]
    assert _job_field(cluster, job.job_id, "Restarts") == "1"
    history = json.loads((out / "ckpt.json").read_text())["history"]
    assert [h["iteration"] for h in history] == list(range(1, 31))
    restarts = [h["restart"] for h in history]
    assert restarts == sorted(restarts) and set(restarts) == {0, 1}  # resumed, did not start over
    assert all(h["world"] == 2 and h["ranks_sum"] == 3.0 for h in history)  # both ranks all-reduced

    out2 = tmp_path / "cancelled"
    job2 = _submit(cluster, tmp_path, 1, ["--out", str(out2), "--iters", "200", "--step-s", "0.2"], STANDIN)
    _wait(lambda: (out2 / "ckpt.json").exists(), 60, "first checkpoint", cluster, job2.job_id)
    cluster.run("scancel", job2.job_id)
    _wait(lambda: not cluster.run("squeue", "-h", "-j", job2.job_id, check=False).strip(), 30,
          "the cancelled job to leave the queue", cluster, job2.job_id)  # fmt: skip
    time.sleep(2)  # a wrongful requeue would show up as PENDING again
    assert _job_field(cluster, job2.job_id, "JobState") == "CANCELLED"
    assert _job_field(cluster, job2.job_id, "Restarts") == "0"
    assert "not requeuing" in job2.paths.stderr.read_text()


def test_curation_embed_runs_as_a_job_array_one_task_per_shard(cluster, tmp_path):
    """`launch curate -- embed ...`: one array task per pending shard; a rerun submits nothing; under
    `embed.array_max=2`, `embed.array_parallel=1` the scheduler gets `--array=0-1%1` and its 2 tasks write the
    same 3 shards (sacct: 2 tasks, both COMPLETED)."""
    import numpy as np
    from PIL import Image

    from dinolike.data.datasets import FashionMNIST

    pool = tmp_path / "pool"
    pool.mkdir()
    fm = FashionMNIST(split="train", limit=30)
    for i in range(30):
        Image.fromarray(fm.images[i]).save(pool / f"{i:02d}.png")
    work = tmp_path / "cur"
    args = ["curate", "--partition", cluster.partition, "--timeout", "10", "--job-dir", str(tmp_path / "jobs"),
            "--wait", "--", "embed", f"work_dir={work}", f"pool=[folder-nolabels:{pool}]", "embed.shard_size=10",
            "embed.progress=false"]
    assert sub.main(args) == 0
    done = sorted((work / "embeddings" / "pool").glob("shard_*.npy"))
    assert len(done) == 3  # 30 images / 10 per shard, each written by its own array task
    job_dirs = [d for d in (tmp_path / "jobs").iterdir() if d.is_dir() and "_" in d.name]
    assert len(job_dirs) == 3
    emb = np.concatenate([np.load(f) for f in done])
    assert emb.shape[0] == 30 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    assert sub.main(args) == 0  # every shard complete: nothing submitted

    # under a scheduler's array limit: 3 pending shards, at most 2 tasks, 1 running at a time
    chunked, jobs = tmp_path / "chunked", tmp_path / "jobs_chunked"
    args = ["curate", "--partition", cluster.partition, "--timeout", "10", "--job-dir", str(jobs), "--wait", "--",
            "embed", f"work_dir={chunked}", f"pool=[folder-nolabels:{pool}]", "embed.shard_size=10",
            "embed.progress=false", "embed.array_max=2", "embed.array_parallel=1"]
    assert sub.main(args) == 0
    chunked_shards = sorted((chunked / "embeddings" / "pool").glob("shard_*.npy"))
    assert [f.name for f in chunked_shards] == [f.name for f in done]
    for a, b in zip(done, chunked_shards, strict=True):
        np.testing.assert_allclose(np.load(a), np.load(b), atol=1e-5)  # the same embeddings as one task per shard
    scripts = list(jobs.glob("*/*_submission.sh"))
    assert len(scripts) == 1 and "#SBATCH --array=0-1%1" in scripts[0].read_text(), scripts
    job_id = scripts[0].name.split("_")[0]

    def finished_tasks() -> list[str] | None:
        # submitit's --wait returns once the last result file exists; the accounting of that task may still say
        # RUNNING / COMPLETING for a moment after it, so read sacct once every task has left those states
        tasks = cluster.run("sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobID,State", check=False).split()
        busy = ("|RUNNING", "|PENDING", "|COMPLETING")
        return sorted(tasks) if len(tasks) == 2 and not any(t.endswith(busy) for t in tasks) else None

    tasks = _wait(finished_tasks, 60, "the accounting of the array's 2 tasks to settle", cluster, job_id)
    assert tasks == [f"{job_id}_0|COMPLETED", f"{job_id}_1|COMPLETED"], tasks


def test_stop_ends_every_daemon_by_pid(cluster):
    pids = dict(cluster.pids)
    assert set(pids) == {"munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd"}
    assert cluster.alive() == pids
    stopped = cluster.stop()
    assert stopped == pids
    for name, pid in pids.items():
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in "ZX", name
