"""Issue 45: the edges next to the run-safety work, each as a user or an operator hits it.

Constant backbones through every export path and through `embed`; `embed --out` checked before the
work; SIGTERM and Ctrl-C during start-up; one output folder, one run; a folder dataset's warning in
log.txt; the run's estimate from its own measured steps. Real runs (tiny), real signals, real processes.
The API's exception family is in tests/test_api_errors.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultlog import record
from test_faults_run import _folder_run, ckpt_names, one_line_error, rgb_folder, smoke, tmpfs  # noqa: F401
from testkit import no_training_step

from dinolike.commands import embed as embed_cmd
from dinolike.commands import export as export_cmd
from dinolike.commands import train as cli
from dinolike.training import estimate

REPO = Path(__file__).resolve().parent.parent


def _stop_with_ctrl_c_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """One Ctrl-C (a real SIGINT to this process) during iteration `step`, as a user's at the terminal."""
    from dinolike.training.ssl import SSLMethod

    real, sent = SSLMethod.forward_loss, []

    def ctrl_c(self, batch, sched, *phase):
        if not sent and int(batch["positions"][0]) // 8 >= step:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, batch, sched, *phase)

    monkeypatch.setattr(SSLMethod, "forward_loss", ctrl_c)


# ---------------------------------------------------------------- 1, 2. constant backbones: every path


def test_no_path_leaves_or_serves_a_constant_teacher(tmp_path, monkeypatch, capsys):
    """Ctrl-C, the time limit and the end all refuse the export of a constant teacher; an older export is
    removed when a run refuses one; `embed` refuses a constant run instead of using its checkpoint."""
    out = tmp_path / "run"
    constant = "model.layerscale=1e-5"
    _stop_with_ctrl_c_at(monkeypatch, 3)
    assert cli.main(_folder_run(tmp_path, out, constant)) == 3  # a stop, not a failure: run again to continue
    line = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("stopped at iteration"))
    assert "the teacher was not exported: it gives every image the same embedding" in line, line
    assert not (out / "teacher_backbone.pth").exists() and ckpt_names(out) == ["ckpt_0000004.pt"]
    monkeypatch.undo()

    # an export left by an older version (or a run with the watch off) sits beside the run
    stale = tmp_path / "stale"
    assert export_cmd.main([str(out), "--format", "official", "--out", str(stale), "--allow-collapsed"]) == 0
    capsys.readouterr()

    def plant_stale_export() -> None:
        shutil.copy(stale / "backbone.pth", out / "teacher_backbone.pth")
        shutil.copy(stale / "backbone.pth.json", out / "teacher_backbone.pth.json")

    plant_stale_export()
    # the time limit (exit 0 for a healthy run) ends the run's budget: constant -> the end's error, exit 1
    assert cli.main(_folder_run(tmp_path, out, constant, "run.time_limit_min=0.00001")) == 1
    err = one_line_error(capsys.readouterr().err)
    assert "with constant embeddings" in err and "older export (teacher_backbone.pth, teacher_backbone.pth.json) " \
        "was removed" in err, err
    assert not (out / "teacher_backbone.pth").exists() and not (out / "teacher_backbone.pth.json").exists()

    # `embed RUN` on it: refused in one line, not embeddings from the checkpoint with cosine 0.99999
    images = rgb_folder(tmp_path / "images", n=8)
    target = tmp_path / "emb.npy"
    assert embed_cmd.main([str(out), "--data", f"folder:{images}", "--out", str(target), "--no-progress"]) == 2
    refused = one_line_error(capsys.readouterr().err)
    assert "refusing to embed" in refused and "--allow-collapsed" in refused and not target.exists()
    assert embed_cmd.main([str(out), "--data", f"folder:{images}", "--out", str(target), "--no-progress",
                           "--allow-collapsed"]) == 0  # the user insists, and is told what was embedded
    said = capsys.readouterr().err
    assert "has no teacher_backbone.pth" in said and "checkpoints/ckpt_0000005.pt" in said, said

    # the end of the run, and a finished run started again, remove an older export too
    plant_stale_export()
    assert cli.main(_folder_run(tmp_path, out, constant)) == 1
    assert "older export" in one_line_error(capsys.readouterr().err)
    assert not (out / "teacher_backbone.pth").exists()
    plant_stale_export()
    assert cli.main(_folder_run(tmp_path, out, constant)) == 1  # nothing to do: the same check
    assert "older export" in one_line_error(capsys.readouterr().err)
    assert not (out / "teacher_backbone.pth").exists()
    gives = refused.split("it gives", 1)[1][:70]
    record("constant-every-path", f"Ctrl-C, exit 3: '{line[:120]}...'; time limit and end: exit 1, older export "
                                  f"removed; embed, exit 2: 'refusing to embed ... it gives{gives}...'")


# ---------------------------------------------------------------------------- 3. embed --out, up front


def test_embed_out_that_cannot_be_written_is_refused_before_the_work(tmp_path, tmpfs, capsys):  # noqa: F811
    """The backbone path does not exist: a check of --out after loading it would report that instead."""
    missing_model = tmp_path / "no_run"
    (tmp_path / "afile").write_text("x")
    assert embed_cmd.main([str(missing_model), "--data", "fmnist:test", "--out",
                           str(tmp_path / "afile" / "sub" / "emb.npy")]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "--out" in err and "afile is a file, not a folder" in err, err
    read_only = tmpfs(1 << 20, "ro")
    assert embed_cmd.main([str(missing_model), "--data", "fmnist:test", "--out", str(read_only / "emb.npy")]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "--out" in err and "cannot write" in err and "Read-only file system" in err, err
    record("embed-out", err)


# --------------------------------------------------------------- 4, 5. signals during start-up


def _foreground_signals() -> None:
    """The child gets SIGINT / SIGQUIT as a terminal's foreground job does, even when the test run itself was
    started in the background of a script (`pytest &`: POSIX shells start those with both ignored, an
    ignored signal stays ignored across exec, and Python then never turns Ctrl-C into KeyboardInterrupt)."""
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def _start(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dinolike.cli", *smoke(out, *extra, epochs=100)]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=_foreground_signals)


def _importing_torch(pid: int) -> bool:
    """True once the process has begun `import torch` (its shared library is mapped)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _wait(condition, p: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert p.poll() is None and time.monotonic() < deadline, f"never {what}"
        time.sleep(0.01)


@pytest.mark.parametrize(("sig", "status", "said"), [(signal.SIGTERM, 3, "stopped by SIGTERM"),
                                                     (signal.SIGINT, 130, "interrupted")])
def test_a_signal_during_import_torch_is_one_line(tmp_path, sig, status, said):
    """SIGTERM used to kill the start-up silently (status -15); Ctrl-C printed a 72-line traceback."""
    p = _start(tmp_path / "run")
    _wait(lambda: _importing_torch(p.pid), p, "imported torch")
    os.kill(p.pid, sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == status, (p.returncode, err)
    assert "Traceback" not in err and said in err and len(err.strip().splitlines()) == 1, err
    record("startup-signals", f"{signal.Signals(sig).name} in import torch: exit {status}, {err.strip()[:80]}...")


def test_sigterm_while_two_processes_start_says_so_and_exits_3(tmp_path):
    """The parent's SIGTERM reaches children still importing: they used to die (-15), the job exit 1 silently."""
    p = _start(tmp_path / "run", "dist.local_processes=2")

    def children_importing() -> bool:
        kids = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and _parent(int(d.name)) == p.pid]
        return len(kids) == 2 and all(_importing_torch(k) for k in kids)

    _wait(children_importing, p, "started 2 children")
    os.kill(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 3, (p.returncode, err)
    assert "Traceback" not in err and "stopped by SIGTERM" in err, err
    record("startup-signals", f"SIGTERM while 2 processes start: exit 3, {err.strip().splitlines()[0][:80]}...")


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


# --------------------------------------------------------------------- 6. one output folder, one run


def test_a_second_run_into_a_folder_in_use_is_refused_in_one_line(tmp_path, capsys):
    """The issue's trial: two runs into one folder, the second started while the first trains. Both used to
    be accepted as a new run; metrics rows, summaries and checkpoints interleaved."""
    out = tmp_path / "run"
    first = _start(out)
    _wait(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 1,
          first, "logged a row")
    try:
        assert cli.main(smoke(out, "run.time_limit_min=0.05", epochs=100)) == 2
        err = one_line_error(capsys.readouterr().err)
        assert f"run.output_dir {out} is in use by another run (process {first.pid} on" in err, err
    finally:
        os.kill(first.pid, signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 3
    its = [int(ln.split('"iteration": ')[1].split(",")[0]) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert its == sorted(set(its)), its  # one run's rows only
    record("output-dir-in-use", f"{err[:200]}...")


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    from dinolike.training.runlock import RunLock

    out = tmp_path / "run"
    out.mkdir()
    code = (f"import os, signal; from dinolike.training.runlock import RunLock; RunLock({str(out)!r}).__enter__(); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == -signal.SIGKILL
    with caplog.at_level("WARNING", logger="dinolike.train"), RunLock(out):
        pass
    warning = next(r.getMessage() for r in caplog.records if "taking over the lock" in r.getMessage())
    assert "killed?" in warning and "process " in warning
    assert warning in (out / "log.txt").read_text()
    caplog.clear()
    with caplog.at_level("WARNING", logger="dinolike.train"), RunLock(out):  # released cleanly: no warning
        pass
    assert not caplog.records


# ------------------------------------------------------------------- 7. a folder dataset's warning


def test_the_grey_scale_warning_of_a_photo_folder_is_in_log_txt(tmp_path, monkeypatch, caplog):
    first_step = no_training_step(monkeypatch)
    folder = rgb_folder(tmp_path / "photos", n=8, size=48)
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="dinolike.train"), pytest.raises(first_step):
        cli.main(smoke(out, f"data.train=folder-nolabels:{folder}"))
    warning = next(r.getMessage() for r in caplog.records if "48x48 RGB image" in r.getMessage())
    assert "1-channel grey-scale" in warning and warning in (out / "log.txt").read_text()


# ------------------------------------------------------------------ 9. the estimate from measured steps


def test_the_estimate_is_the_measured_step_time_of_this_run(tmp_path, monkeypatch, capsys):
    """A fake clock that advances 10 s per reading: the timer reads it once at its start and once per
    iteration after, so whatever the FLOPs say, the estimate is 10 s per iteration measured."""
    ticks = iter(range(0, 10**6, 10))
    monkeypatch.setattr(estimate, "clock", lambda: float(next(ticks)), raising=False)
    out = tmp_path / "run"
    assert cli.main(smoke(out, epochs=3)) == 0  # 30 iterations
    log = (out / "log.txt").read_text()
    line = next(ln for ln in log.splitlines() if ln.startswith("  estimate  ~"))
    # timed from the end of iteration 1 over 10 iterations: 10 s each, 19 left
    assert line.startswith("  estimate  ~3 min for the 19 iterations left: 10 s per iteration, timed on "
                           "iterations 2-11 on this device (cpu, fp32, 1 process)"), line
    assert log.index("  device    cpu") < log.index(line) < log.index("iteration 12/30 | loss")
