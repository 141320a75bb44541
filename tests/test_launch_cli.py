"""Launcher tests that need no SLURM: argument handling, the sbatch script submitit writes (through a
fake `sbatch` that captures it), and the per-task requeue protocol (through a fake `scontrol`)."""

from __future__ import annotations

import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
from testkit import SMOKE

from dinolike.commands import submit as sub
from dinolike.launch.task import EXIT_REQUEUE, LaunchTask, SignalGuard, resolve_entry

SEEN: dict = {}


def fake_entry(argv: list[str]) -> int:
    """Entry used by LaunchTask in these tests: records what it saw, returns the status asked for."""
    SEEN["argv"] = list(argv)
    SEEN["env"] = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                  "MASTER_PORT", "CUDA_VISIBLE_DEVICES")}  # fmt: skip
    SEEN["cwd"] = os.getcwd()
    return int(argv[argv.index("--status") + 1]) if "--status" in argv else 0


@pytest.fixture
def clean_process(monkeypatch):
    """LaunchTask exports env vars, changes directory and installs signal handlers: undo all of it."""
    saved_env = dict(os.environ)
    saved_sig = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    monkeypatch.chdir(os.getcwd())
    SEEN.clear()
    yield
    os.environ.clear()
    os.environ.update(saved_env)
    for s, h in saved_sig.items():
        signal.signal(s, h)


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_slurm_bin(tmp_path, monkeypatch):
    """`sbatch` that keeps the script it is given, `scontrol` that logs its calls, and `srun`."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _write_exe(bindir / "sbatch", f'#!/bin/sh\ncp "$1" {tmp_path}/captured.sh\necho "Submitted batch job 4242"\n')
    _write_exe(bindir / "srun", "#!/bin/sh\nexit 0\n")
    _write_exe(
        bindir / "scontrol",
        f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n'
        f'if [ "$1" = show ]; then echo "JobId=$4 JobState=${{FAKE_STATE:-RUNNING}} Requeue=1"; fi\n',
    )
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_parse_splits_passthrough_and_defaults_one_task_per_gpu():
    args, rest = sub.parse_args(
        ["train", "--nodes", "2", "--gpus-per-node", "8", "--partition", "p", "--timeout", "30",
         "--", "--config", "configs/x.yaml", "optim.epochs=3", "--nodes", "9"]
    )  # fmt: skip
    assert (args.command, args.nodes, args.tasks_per_node, args.timeout) == ("train", 2, 8, 30)
    assert rest == ["--config", "configs/x.yaml", "optim.epochs=3", "--nodes", "9"]  # untouched after --


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--gpus-per-node", "4", "--tasks-per-node", "2"], "one task per GPU"),
        (["eval", "--local", "--nodes", "2"], "--nodes must be 1"),
        (["train", "--timeout", "1", "--signal-delay-s", "90"], "shorter than --timeout"),
        (["bench"], "invalid choice"),
    ],
)
def test_parse_rejects_bad_requests_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        sub.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_sbatch_script_has_signal_requeue_and_resources(fake_slurm_bin, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, rest = sub.parse_args(
        ["distill", "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "10", "--mem-gb", "64",
         "--partition", "learn", "--account", "acct", "--qos", "high", "--constraint", "volta32gb",
         "--timeout", "90", "--signal-delay-s", "180", "--job-dir", str(tmp_path / "jobs"),
         "--", "--config", "c.yaml"]
    )  # fmt: skip
    job = sub.submit(args, rest)
    assert job.job_id == "4242"
    script = (tmp_path / "captured.sh").read_text()
    for flag in ("--signal=USR2@180", "--requeue", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4",
                 "--cpus-per-task=10", "--mem=64GB", "--partition=learn", "--account=acct", "--qos=high",
                 "--constraint=volta32gb", "--time=90", "--job-name=dinolike-distill"):  # fmt: skip
        assert f"#SBATCH {flag}\n" in script, flag
    assert f"{tmp_path / 'jobs'}/%j/%j_%t_log.out" in script  # per-task logs in the job folder
    # the pickled task is what every SLURM task will run
    import submitit

    task = submitit.core.utils.DelayedSubmission.load(job.paths.submitted_pickle).function
    assert isinstance(task, LaunchTask)
    assert (task.command, task.args, task.cwd) == ("distill", ["--config", "c.yaml"], str(tmp_path))


def test_cli_reports_a_rejected_submission(tmp_path, monkeypatch, capsys):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _write_exe(bindir / "srun", "#!/bin/sh\n")
    _write_exe(bindir / "sbatch", "#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    status = sub.main(["train", "--partition", "nope", "--job-dir", str(tmp_path / "j"), "--", "--config",
                       str(SMOKE)])
    assert status == 1
    assert "invalid partition" in capsys.readouterr().err


def _slurm_task_env(monkeypatch, rank: int, job_id: str = "77", restarts: int = 0) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": job_id, "SLURM_PROCID": str(rank),
           "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0",
           "SLURM_JOB_NODELIST": "node[3-4]", "SLURM_RESTART_COUNT": str(restarts)}  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)


def _task(tmp_path: Path, status: int) -> LaunchTask:
    return LaunchTask("train", ["--config", "c.yaml", "--status", str(status)], cwd=str(tmp_path),
                      entry=f"{__name__}:fake_entry", max_requeues=2)  # fmt: skip


def test_task_exports_torch_env_and_runs_the_command(clean_process, fake_slurm_bin, tmp_path, monkeypatch):
    _slurm_task_env(monkeypatch, rank=1)
    assert _task(tmp_path, 0)() == 0
    assert SEEN["argv"] == ["train", "--config", "c.yaml", "--status", "0"]
    env = SEEN["env"]
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("1", "2", "1", "node3")
    assert 20000 <= int(env["MASTER_PORT"]) <= 60000
    assert env["CUDA_VISIBLE_DEVICES"] is None  # all GPUs stay visible; the trainer picks cuda:LOCAL_RANK
    assert SEEN["cwd"] == str(tmp_path)
    assert not (tmp_path / "scontrol.log").exists()


def test_rank0_requeues_a_running_job_on_exit_requeue(clean_process, fake_slurm_bin, tmp_path, monkeypatch):
    _slurm_task_env(monkeypatch, rank=0)
    with pytest.raises(SystemExit) as e:  # SystemExit, not Exception: submitit writes no result
        _task(tmp_path, EXIT_REQUEUE)()
    assert e.value.code == EXIT_REQUEUE
    calls = (tmp_path / "scontrol.log").read_text().splitlines()
    assert calls == ["show job -o 77", "requeue 77"]


@pytest.mark.parametrize(
    "rank, state, restarts",
    [(1, "RUNNING", 0), (0, "CANCELLED", 0), (0, "PENDING", 0), (0, "RUNNING", 2)],
    ids=["not-rank0", "cancelled", "already-requeued", "too-many-restarts"],
)
def test_no_requeue_when_not_rank0_cancelled_or_exhausted(
    clean_process, fake_slurm_bin, tmp_path, monkeypatch, rank, state, restarts
):
    _slurm_task_env(monkeypatch, rank=rank, restarts=restarts)
    monkeypatch.setenv("FAKE_STATE", state)
    with pytest.raises(SystemExit) as e:
        _task(tmp_path, EXIT_REQUEUE)()
    assert e.value.code == EXIT_REQUEUE
    log = (tmp_path / "scontrol.log").read_text() if (tmp_path / "scontrol.log").exists() else ""
    assert "requeue" not in log


def test_local_executor_requeue_code_and_failure_status(clean_process, tmp_path, monkeypatch):
    from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

    for k, v in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "5", "SUBMITIT_LOCAL_NTASKS": "1",
                 "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        _task(tmp_path, EXIT_REQUEUE)()
    assert e.value.code == LOCAL_REQUEUE_RETURN_CODE  # the local controller restarts the tasks
    with pytest.raises(RuntimeError, match="exited with status 2"):
        _task(tmp_path, 2)()


def _wait_until(cond, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_signal_guard_forwards_early_usr2_exits_on_term_and_ignores_after_finish(clean_process):
    guard = SignalGuard().install()
    os.kill(os.getpid(), signal.SIGUSR2)  # arrives before the "training loop" has a handler
    assert _wait_until(lambda: guard.received == ["SIGUSR2"])
    got: list[int] = []
    signal.signal(signal.SIGUSR2, lambda s, f: got.append(s))  # the loop installs its stop flag
    assert _wait_until(lambda: got == [signal.SIGUSR2]), "early SIGUSR2 was not handed to the new handler"

    guard = SignalGuard().install()
    with pytest.raises(SystemExit) as e:
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_until(lambda: False, timeout=1.0)
    assert e.value.code == 128 + signal.SIGTERM
    guard.finish()
    os.kill(os.getpid(), signal.SIGTERM)  # ignored once the command has returned
    assert _wait_until(lambda: guard.received[-1:] == ["SIGTERM"] and len(guard.received) == 2)


def test_resolve_entry_errors_are_clear():
    with pytest.raises(ValueError, match="package.module:function"):
        resolve_entry("dinolike.cli")
    assert resolve_entry("os.path:join") is os.path.join


def test_module_entry_point_shows_help():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "launch", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=60)  # fmt: skip
    assert out.returncode == 0 and "--gpus-per-node" in out.stdout and "--local" in out.stdout


def test_cluster_refuses_non_root_with_a_clear_reason(monkeypatch, tmp_path):
    from slurm import cluster

    monkeypatch.setattr(cluster.os, "geteuid", lambda: 1000)
    with pytest.raises(cluster.ClusterUnavailable, match="needs root"):
        cluster.start_cluster(tmp_path / "c")
    assert not (tmp_path / "c").exists()  # nothing written before the check


def test_cluster_apt_failure_is_unavailable_not_a_crash(monkeypatch, tmp_path):
    from slurm import cluster

    bindir = tmp_path / "bin"
    bindir.mkdir()
    _write_exe(bindir / "apt-get", "#!/bin/sh\necho 'E: Unable to locate package slurmctld' >&2\nexit 100\n")
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setattr(cluster, "missing_packages", lambda: ["slurmctld"])
    with pytest.raises(cluster.ClusterUnavailable, match="Unable to locate package"):
        cluster.ensure_packages()


def test_cluster_config_has_what_a_single_node_needs(tmp_path):
    from slurm import cluster

    (tmp_path / "etc").mkdir()
    ports = {"slurmctld": 7001, "slurmd": 7002, "slurmdbd": 7003}
    conf = cluster.write_configs(tmp_path, "t", 2, ports, tmp_path / "munge.sock").read_text()
    for line in ("ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
                 "ReturnToService=2", "AccountingStorageType=accounting_storage/slurmdbd",
                 "AccountingStoragePort=7003", f"AccountingStoragePass={tmp_path / 'munge.sock'}"):  # fmt: skip
        assert f"{line}\n" in conf, line
    node = next(ln for ln in conf.splitlines() if ln.startswith("NodeName="))
    assert "NodeName=localhost" in node and "CPUs=2" in node
    mem_total_mb = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    assert int(node.split("RealMemory=")[1].split()[0]) < mem_total_mb  # above real memory drains the node
    for key in ("StateSaveLocation", "SlurmdSpoolDir", "SlurmctldLogFile"):
        assert f"{key}={tmp_path}" in conf  # all state inside the workdir
    dbd = tmp_path / "etc" / "slurmdbd.conf"
    assert stat.S_IMODE(dbd.stat().st_mode) == 0o600 and "DbdPort=7003" in dbd.read_text()
