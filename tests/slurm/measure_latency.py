"""Measure the test cluster: start time, job start latency, end-to-end 2-task job, requeue latency, stop.

Why: the SLURM tests' duration is dominated by these numbers; this script reports them so a change in
the cluster config (KillWait, cred_expire, sched_interval) can be judged. Not a test.

    sudo .venv/bin/python tests/slurm/measure_latency.py [--workdir /tmp/dinolike-slurm-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from slurm.cluster import start_cluster  # noqa: E402

from dinolike.launch import submit as sub  # noqa: E402


def _wait(cond, timeout: float = 120, step: float = 0.05) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("condition not met")
        time.sleep(step)
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dinolike-slurm-bench-", dir="/tmp"))
    os.chdir(REPO)
    t0 = time.monotonic()
    cluster = start_cluster(workdir)
    numbers: dict[str, float] = {"install_s": cluster.timings["install_s"],
                                 "start_s": time.monotonic() - t0}  # fmt: skip
    os.environ["SLURM_CONF"] = str(cluster.conf)
    os.environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    try:
        state = lambda jid: cluster.run("squeue", "-h", "-j", jid, "-o", "%T", check=False).strip()
        out = workdir / "out"
        job_args, rest = sub.parse_args(
            ["train", "--tasks-per-node", "2", "--timeout", "10", "--job-dir", str(workdir / "jobs"),
             "--entry", "tests.slurm.standin_train:main", "--", "--out", str(out), "--iters", "100",
             "--ckpt-every", "10", "--step-s", "0.1"]
        )  # fmt: skip
        t0 = time.monotonic()
        job = sub.submit(job_args, rest)
        numbers["submit_to_running_s"] = _wait(lambda: state(job.job_id) == "RUNNING") + 0.0
        numbers["submit_to_first_ckpt_s"] = time.monotonic() - t0 + _wait(lambda: (out / "ckpt.json").exists())
        t1 = time.monotonic()
        cluster.run("scontrol", "requeue", job.job_id)
        _wait(lambda: state(job.job_id) == "PENDING")
        numbers["requeue_to_running_s"] = time.monotonic() - t1 + _wait(lambda: state(job.job_id) == "RUNNING")
        _wait(lambda: job.done(), timeout=300, step=0.2)
        assert job.results() == [0, 0]
        numbers["whole_job_incl_requeue_s"] = time.monotonic() - t0
        numbers["standin_compute_s"] = 100 * 0.1
    finally:
        t2 = time.monotonic()
        cluster.stop()
        numbers["stop_s"] = time.monotonic() - t2
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({k: round(v, 2) for k, v in numbers.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
