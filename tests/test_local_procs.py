"""`dist.local_processes`: `dinolike train` starting its own process group on one machine."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from testkit import REPO, SMOKE

from dinolike.checkpoints import files as ck
from dinolike.local_procs import run_local, threads_per_process

CHILD = """
import os, sys, time
out = sys.argv[1]
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS",
        "DINOLIKE_LOCAL_CHILD")
with open(os.path.join(out, "rank" + os.environ["RANK"]), "w") as f:
    f.write(" ".join(os.environ[k] for k in keys))
if os.environ["RANK"] == "1" and len(sys.argv) > 2:
    sys.exit(int(sys.argv[2]))  # this rank fails; the other would wait for it forever
if len(sys.argv) > 2:
    time.sleep(600)
"""


def test_children_get_ranks_one_rendezvous_and_a_share_of_the_cores(tmp_path: Path) -> None:
    assert run_local([str(tmp_path)], 2, program=[sys.executable, "-c", CHILD]) == 0
    envs = [(tmp_path / f"rank{r}").read_text().split() for r in range(2)]
    assert [e[:3] for e in envs] == [["0", "2", "0"], ["1", "2", "1"]]
    assert envs[0][3:] == envs[1][3:]  # same MASTER_ADDR/PORT, same thread share
    assert envs[0][5] == str(threads_per_process(2))
    assert envs[0][6] == envs[1][6] == "1"  # children leave the final kNN to the parent


def test_one_failing_child_stops_the_others_and_sets_the_status(tmp_path: Path) -> None:
    t = time.monotonic()
    status = run_local([str(tmp_path), "7"], 2, program=[sys.executable, "-c", CHILD])
    assert status == 7
    assert time.monotonic() - t < 60  # rank 0 (sleeping 600 s) was terminated, not waited for


def test_sigterm_checkpoints_both_processes_and_the_run_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dinolike.cli", "train", "--config", str(SMOKE), f"run.output_dir={out}",
           "dist.local_processes=2", "optim.epochs=10", "run.log_every=1", "run.checkpoint_every=1000"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        assert p.poll() is None and time.time() < deadline, p.communicate()[0].decode()
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    log = p.communicate(timeout=120)[0].decode()
    assert p.returncode == 3, log
    assert "2 processes" in log and "checkpoint saved" in log
    stopped = ck.load_checkpoint(ck.list_checkpoints(out / "checkpoints")[-1])["iteration"]
    assert 3 <= stopped < 100

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"at iteration {stopped}" in done.stderr  # resumed where the stop left it, not from 0
    assert ck.load_checkpoint(ck.list_checkpoints(out / "checkpoints")[-1])["iteration"] == 100
