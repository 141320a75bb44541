"""`dinolike pipeline` end to end on the smoke config: real curation of the demo pool (injected copies and
test-set leaks), real training, high-res phase, distillation and evals; then what a rerun does (nothing;
resume after a kill; a changed distill config reruns distill and eval only); then the same pipeline as
dependent SLURM jobs on the test cluster, which must end with the same results file.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_launch import cluster  # noqa: F401 - the module-scoped test SLURM cluster (skips without root/apt)
from testkit import REPO, rows

from dinolike.commands.pipeline import main
from dinolike.pipeline.fingerprint import file_digest

SMOKE = str(REPO / "configs" / "pipeline" / "fmnist_smoke.yaml")
STAGES = ["curate", "pretrain", "highres", "distill", "eval"]


def _state(out: Path, stage: str) -> dict:
    return json.loads((out / "stages" / f"{stage}.json").read_text())


def _cli(out: Path, *extra: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dinolike.cli", "pipeline", "--config", SMOKE,
                           f"output_dir={out}", *extra], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The smoke pipeline run once; its results file kept aside for later comparison."""
    out = tmp_path_factory.mktemp("pipeline") / "smoke"
    t0 = time.monotonic()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["--config", SMOKE, f"output_dir={out}"])
    assert status == 0, err.getvalue()[-3000:]
    print(f"smoke pipeline: {time.monotonic() - t0:.1f}s")
    return {"out": out, "results": (out / "eval" / "results.json").read_text(),
            "states": {s: _state(out, s) for s in STAGES}, "stderr": err.getvalue()}


def test_smoke_pipeline_writes_lineage_whose_fingerprints_chain(smoke: dict) -> None:
    out = smoke["out"]
    lineage = json.loads((out / "lineage.json").read_text())
    stages, artifacts = lineage["stages"], lineage["artifacts"]
    assert list(stages) == STAGES and all(s["status"] == "done" for s in stages.values())
    for rel, rec in artifacts.items():  # every recorded artifact is on disk with its fingerprint
        assert file_digest(out / rel) == rec["fingerprint"], rel
        assert rec["git_commit"] and rec["started"] and rec["finished"] and rec["stage"] in STAGES
    # each stage's inputs are artifacts of the stage it builds on, with the fingerprints recorded there
    expect = {"pretrain": {"curate": ["manifest"]}, "highres": {"curate": ["manifest"], "pretrain": ["checkpoint"]},
              "distill": {"curate": ["manifest"], "highres": ["checkpoint"]},
              "eval": {"pretrain": ["pretrain"], "highres": ["highres"], "distill": ["distill"]}}
    for stage, ups in expect.items():
        st = stages[stage]
        assert st["upstream"] == {u: stages[u]["fingerprint"] for u in ups}
        for up, keys in ups.items():
            for key in keys:
                rec = st["inputs"][key]
                assert artifacts[rec["path"]]["stage"] == up
                assert artifacts[rec["path"]]["fingerprint"] == rec["fingerprint"]
    assert stages["highres"]["inputs"]["checkpoint"]["path"] == "pretrain/checkpoints/ckpt_0000020.pt"
    assert f"data.train=manifest:{out / 'curate' / 'work' / 'manifest.txt'}" in stages["pretrain"]["overrides"]
    # the stages ran the existing commands with the recipes the pipeline names
    assert rows(out / "pretrain")[-1]["iteration"] == 20
    assert rows(out / "highres")[0]["iteration"] > 20  # continued from pretrain's checkpoint
    results = json.loads(smoke["results"])
    assert set(results["models"]) == {"pixels", "random", "pretrain", "highres", "distill"}
    for model in results["models"].values():
        for proto in ("knn", "linear", "logreg"):
            assert 10.0 < model[proto]["top1"] <= 100.0 and model[proto]["n_test"] == 500
    report = (out / "report.md").read_text()
    for png in ("curation_counts", "pretrain_curves", "distill_curves", "eval"):
        assert f"report/{png}.png" in report and (out / "report" / f"{png}.png").stat().st_size > 1000
    # high-res logged one iteration: a table of its values, not a picture of one dot per panel
    assert not (out / "report" / "highres_curves.png").exists() and "highres_curves" not in report
    last = rows(out / "highres")[-1]
    assert f"| {last['iteration']} | {last['loss']:.4g} |" in report.split("**highres**")[1].split("**distill**")[0]
    # Fashion-MNIST images as files (the curated manifest) are what the 1-channel recipes are for: no warning
    assert "grey-scale" not in smoke["stderr"] and "read as 1-channel" not in smoke["stderr"]
    assert "| pixels |" in report and "| random |" in report and "eval-set leaks removed" in report


def test_curated_manifest_holds_no_test_set_leak(smoke: dict) -> None:
    out = smoke["out"]
    truth = json.loads((out / "curate" / "demo" / "truth.json").read_text())
    leaks = {str(out / "curate" / "demo" / f) for f, v in truth["files"].items() if v["kind"] == "test_copy"}
    lines = [x.split("\t")[0] for x in (out / "curate" / "work" / "manifest.txt").read_text().splitlines()
             if x and not x.startswith("#")]
    assert len(leaks) == 50 and len(lines) == 300
    assert not leaks & set(lines)
    assert all(Path(p).is_file() for p in lines)
    summary = json.loads((out / "curate" / "work" / "summary.json").read_text())
    assert summary["dedup"]["leaks_removed"] >= 50


def test_second_run_does_nothing(smoke: dict, capsys: pytest.CaptureFixture) -> None:
    out = smoke["out"]

    def files() -> dict[Path, int]:  # every file but the folder lock, which records each run's pid
        return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".pipeline.lock"}

    before = files()
    assert main(["--config", SMOKE, f"output_dir={out}"]) == 0
    assert "every stage is up to date, nothing to do" in capsys.readouterr().err
    assert files() == before and len(before) > 100


def test_killed_during_pretrain_resumes_there_without_redoing_curate(smoke: dict, tmp_path: Path) -> None:
    """A copy of the finished curation, then pretraining (40 iterations) killed after its first checkpoint."""
    out = tmp_path / "p"
    (out / "stages").mkdir(parents=True)
    shutil.copytree(smoke["out"] / "curate", out / "curate")  # the fingerprint does not depend on the folder
    shutil.copy(smoke["out"] / "stages" / "curate.json", out / "stages")
    curate_files = {p: p.stat().st_mtime_ns for p in (out / "curate").rglob("*") if p.is_file()}
    args = ["stages=[curate,pretrain]", "pretrain.optim.epoch_length=20"]
    proc = subprocess.Popen([sys.executable, "-m", "dinolike.cli", "pipeline", "--config", SMOKE,
                             f"output_dir={out}", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((out / "pretrain" / "checkpoints").glob("ckpt_*.pt")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1]
    assert "curate: up to date" in err
    assert _state(out, "pretrain")["status"] == "running"
    killed_at = rows(out / "pretrain")[-1]["iteration"]
    assert 10 <= killed_at < 40

    done = _cli(out, *args)
    assert done.returncode == 0, done.stderr
    assert "curate: up to date" in done.stderr and "pretrain: resuming" in done.stderr
    assert "resumed from" in done.stderr and "ckpt_00000" in done.stderr
    iters = [r["iteration"] for r in rows(out / "pretrain")]
    assert iters[-1] == 40 and sorted(set(iters)) == list(range(5, 41, 5))
    assert _state(out, "pretrain")["status"] == "done"
    assert {p: p.stat().st_mtime_ns for p in (out / "curate").rglob("*") if p.is_file()} == curate_files


def test_submit_runs_the_smoke_pipeline_as_dependent_slurm_jobs(smoke: dict, cluster, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "slurm"
    t0 = time.monotonic()
    env = {**cluster.environ(), "OMP_NUM_THREADS": "1"}
    proc = _cli(out, "--submit", "--wait", f"submit.launch=[--partition,{cluster.partition},--timeout,10]",
                env=env, timeout=900)
    print(f"smoke pipeline on SLURM: {time.monotonic() - t0:.1f}s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = {line.split(":")[0]: line.split("job ")[1].split()[0] for line in proc.stdout.splitlines()
           if ": job " in line}
    assert list(ids) == STAGES
    # pool 751 images, references (the 10k test set) and seeds 90, 5000 a shard: 4 array tasks
    assert "curate embed: 4 shard(s) as job array" in proc.stdout
    for prev, stage in zip(STAGES, STAGES[1:], strict=False):
        assert f"(after {ids[prev]})" in proc.stdout.split(f"{stage}: job")[1].splitlines()[0]
    assert (out / "eval" / "results.json").read_text() == smoke["results"]
    assert all(_state(out, s)["status"] == "done" for s in STAGES)
    again = _cli(out, "--submit", f"submit.launch=[--partition,{cluster.partition}]", env=env)
    assert again.returncode == 0 and "nothing to submit" in again.stderr


def test_distill_config_change_reruns_distill_and_eval_only(smoke: dict, capsys: pytest.CaptureFixture) -> None:
    out, before = smoke["out"], smoke["states"]
    assert main(["--config", SMOKE, f"output_dir={out}", "distill.optim.epochs=1.5"]) == 0
    err = capsys.readouterr().err
    after = {s: _state(out, s) for s in STAGES}
    assert "dinolike pipeline: ran distill, eval;" in err
    for s in ("curate", "pretrain", "highres"):
        assert after[s] == before[s]
    for s in ("distill", "eval"):
        assert after[s]["fingerprint"] != before[s]["fingerprint"] and after[s]["finished"] != before[s]["finished"]
    assert rows(out / "distill")[-1]["iteration"] == 15 and rows(out / "distill")[0]["iteration"] == 5
    assert after["eval"]["upstream"]["distill"] == after["distill"]["fingerprint"]


def test_bad_input_is_one_line_error_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "p"
    assert main(["--config", SMOKE, f"output_dir={out}", "pretrain.optim.epocs=3"]) == 2
    assert "pretrain: unknown config key 'optim.epocs'" in capsys.readouterr().err
    assert main(["--config", SMOKE, f"output_dir={out}", "eval.overrides=[eval.knn.temprature=1]"]) == 2
    assert "did you mean 'eval.knn.temperature'" in capsys.readouterr().err
    assert main(["--config", SMOKE, f"output_dir={out}", "stages=[eval,curate]"]) == 2
    assert "stages run in the order" in capsys.readouterr().err
    assert main(["--config", SMOKE, f"output_dir={out}", "distill.config=nope.yaml"]) == 2
    assert "distill.config: file not found" in capsys.readouterr().err
    assert main(["--config", SMOKE, f"output_dir={out}", "--stage", "distill"]) == 2
    assert "reads the output of 'curate', which has not finished" in capsys.readouterr().err
    assert not (out / "curate").exists() and not (out / "distill").exists()


def test_more_bad_input_fails_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Eval lines and training values are checked when the pipeline starts, not after hours of training;
    flags that would be ignored are errors."""
    out = tmp_path / "p"
    cases = {
        "eval.protocols=[lienar]": "the protocol must be one of knn, linear, logreg",
        "eval.protocols=['knn --label-fraction 0.1']": "is not a valid `dinolike eval` command line",
        "distill.precision.cuda=fp16": "distill: precision.cuda must be one of",
    }
    for override, message in cases.items():
        assert main(["--config", SMOKE, f"output_dir={out}", override]) == 2, override
        assert message in capsys.readouterr().err, override
    assert main(["--config", SMOKE, f"output_dir={out}", "stages=[curate,pretrain,eval]", "--stage", "highres"]) == 2
    assert "--stage highres: not among this pipeline's stages" in capsys.readouterr().err
    assert main(["--config", SMOKE, f"output_dir={out}", "--wait"]) == 2
    assert "--wait goes with --submit" in capsys.readouterr().err
    assert not any((out / s).exists() for s in STAGES)  # no stage started


def test_fingerprint_ignores_how_a_stage_runs_and_moved_folders(tmp_path: Path) -> None:
    """A worker count, a progress bar or a checkpoint interval does not start a stage over; a recipe
    value does; a pipeline folder moved elsewhere (non-ASCII name included) keeps its fingerprints, and a
    sibling folder whose name starts the same is not mistaken for it."""
    from dinolike.pipeline.config import load_pipeline
    from dinolike.pipeline.stages import build_stages, stage_fingerprint

    def fp(out: Path, *overrides: str) -> str:
        cfg = load_pipeline(SMOKE, [f"output_dir={out}", "stages=[pretrain]", *overrides])
        return stage_fingerprint(out, build_stages(cfg)[0], {})[0]

    out = tmp_path / "runs" / "p"
    base = fp(out)
    assert fp(out, "pretrain.overrides=[data.num_workers=3,run.progress=false,run.checkpoint_every=7]") == base
    assert fp(out, "pretrain.overrides=[optim.base_lr=0.001]") != base
    assert fp(tmp_path / "Läufe" / "p") == base
    assert fp(tmp_path / "runs" / "p2") == base  # its own folder, written relative to itself


def test_changed_stage_is_moved_aside_not_deleted(tmp_path: Path) -> None:
    from dinolike.pipeline.config import load_pipeline
    from dinolike.pipeline.lineage import state_path, write_json
    from dinolike.pipeline.stages import begin_stage, build_stages

    out = tmp_path / "p"
    stage = build_stages(load_pipeline(SMOKE, [f"output_dir={out}", "stages=[pretrain]"]))[0]
    (out / "pretrain" / "checkpoints").mkdir(parents=True)
    (out / "pretrain" / "checkpoints" / "ckpt_0000010.pt").write_bytes(b"days of training")
    write_json(state_path(out, "pretrain"), {"fingerprint": "old0", "started": "then"})
    begin_stage(out, stage, "new1", {}, {})
    kept = out / "pretrain.stale-old0" / "checkpoints" / "ckpt_0000010.pt"
    assert kept.read_bytes() == b"days of training" and not (out / "pretrain").exists()


def test_stage_stopped_by_its_time_limit_is_not_done(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`run.time_limit_min` ends a training command with status 0 and a checkpoint short of the schedule:
    the pipeline must not mark the stage finished nor start the next one on it."""
    from dinolike.pipeline.config import load_pipeline
    from dinolike.pipeline.stages import build_stages, training_finished

    out = tmp_path / "p"
    stage = build_stages(load_pipeline(SMOKE, [f"output_dir={out}", "stages=[pretrain]"]))[0]
    total = round(stage.config["optim"]["epochs"] * stage.config["optim"]["epoch_length"])
    ckpts = out / "pretrain" / "checkpoints"
    assert not training_finished(out, stage)  # nothing yet
    ckpts.mkdir(parents=True)
    (ckpts / f"ckpt_{total - 5:07d}.pt").touch()
    assert not training_finished(out, stage)
    (ckpts / f"ckpt_{total:07d}.pt").touch()
    assert training_finished(out, stage)
    # end to end: a time limit that stops pretraining at once
    out2 = tmp_path / "q"
    rc = main(["--config", SMOKE, f"output_dir={out2}", "stages=[curate,pretrain,eval]",
               "pretrain.overrides=[run.time_limit_min=0.0001]"])
    assert rc == 3 and "stage 'pretrain' stopped with a checkpoint" in capsys.readouterr().err
    assert _state(out2, "pretrain")["status"] == "running" and not (out2 / "eval").exists()


def test_report_and_headline_tolerate_odd_input(tmp_path: Path) -> None:
    from dinolike.pipeline.report import _train_line
    from dinolike.pipeline.stages import _headline

    (tmp_path / "metrics.jsonl").write_text('{"iteration": 5, "loss": 2.0}\n{"iteration": 10, "lo\n')
    assert _train_line(tmp_path).startswith("iterations 5-5, final loss 2.000")
    assert _headline("knn", {"k100_top1": 1.0, "k10_top1": 2.0}) == 2.0
    assert _headline("knn", {"k20_top1": 3.0, "k10_top1": 2.0}) == 3.0


def test_inputs_recorded_by_a_finished_stage_are_not_hashed_again(tmp_path: Path) -> None:
    """A finished stage's artifact keeps its recorded fingerprint while its size and time are unchanged
    (no re-reading of GB checkpoints on each run); a rewritten file is hashed again."""
    import os

    from dinolike.pipeline.lineage import artifact_record, recorded_digest, state_path, write_json

    out = tmp_path / "p"
    ckpt = out / "pretrain" / "checkpoints" / "ckpt_0000020.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    rec = artifact_record(out, ckpt)
    assert rec["fingerprint"] == file_digest(ckpt)
    write_json(state_path(out, "pretrain"), {"status": "done", "artifacts": {
        "pretrain/checkpoints/ckpt_0000020.pt": {**rec, "fingerprint": "recorded"}}})
    assert recorded_digest(out, ckpt, ["pretrain"]) == "recorded"
    assert recorded_digest(out, ckpt, ["curate"]) is None  # only the stages named are trusted
    ckpt.write_bytes(b"WEIGHTS")  # same size, new time
    os.utime(ckpt, ns=(rec["mtime_ns"] + 10**9, rec["mtime_ns"] + 10**9))
    assert recorded_digest(out, ckpt, ["pretrain"]) is None


def test_second_pipeline_in_the_same_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dinolike.pipeline.run import hold_folder

    out = tmp_path / "p"
    held = hold_folder(out)  # as a first `dinolike pipeline` running there would
    assert main(["--config", SMOKE, f"output_dir={out}", "stages=[curate]"]) == 2
    err = capsys.readouterr().err
    assert "is in use by another `dinolike pipeline` (pid" in err and not (out / "curate").exists()
    held.close()


def test_eval_overrides_may_set_the_models_data_statistics(tmp_path: Path) -> None:
    """`eval.overrides` are model eval keys (data.mean / std too), checked against the model schema; the
    pixel baseline gets only the eval.* ones."""
    from dinolike.config import ConfigError
    from dinolike.pipeline.config import load_pipeline
    from dinolike.pipeline.stages import build_stages

    def stages(*o: str):
        return build_stages(load_pipeline(SMOKE, [f"output_dir={tmp_path / 'p'}", *o]))

    ev = stages("eval.overrides=['data.mean=[0.3]','data.std=[0.3]','eval.knn.ks=[10]']")[-1]
    assert ev.name == "eval" and "data.mean=[0.3]" in ev.overrides
    with pytest.raises(ConfigError, match="data.meen"):
        stages("eval.overrides=['data.meen=[0.3]']")
