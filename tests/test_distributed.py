"""Distributed training on CPU (gloo): two processes against one with the same global batch, checkpoints
that move between world sizes, and the rank/world mapping of torchrun and SLURM variables.

Why the equality can hold: the data stream is addressed by global position (2 x B on two ranks holds the
same images as 1 x 2B on one), Sinkhorn-Knopp and the centres all-reduce over the global batch, DDP and
FSDP average gradients, and the logged metrics are averaged over ranks. KoLeo is per rank by design and
drop path draws from per-rank RNG, so both are off here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from testkit import REPO, SMOKE, rows

from dinolike import dist
from dinolike.checkpoints import files as ck

GLOBAL_BATCH = 16
ITERS = 4  # 2 epochs of 2 iterations; checkpoints at 2 and 4
COMMON = (
    "optim.epochs=2", "optim.epoch_length=2", "optim.warmup_epochs=1", "teacher.warmup_temp_epochs=1",
    "run.log_every=1", "run.checkpoint_every=2", "run.progress=false", "run.device=cpu",
    "loss.koleo_weight=0", "model.drop_path_rate=0", "data.limit=256", "data.num_workers=0",
    "eval.knn_every=4", "eval.knn_train=fmnist:train", "eval.knn_val=fmnist:test", "eval.knn_limit=64",
)
# Tolerances. Only the order of fp32 summations differs (the batch split, the all-reduce of gradients and
# of the Sinkhorn sums), so the runs agree to rounding: measured max relative loss difference 2.3e-7 over
# 4 iterations (DDP and FSDP alike; fp32 eps is 1.2e-7), student weights 5e-7, teacher weights 8e-9 after
# 4 AdamW steps. The tolerances leave ~20-400x room for rounding noise and are still far below what a real
# mismatch causes: a wrong batch split, a missing all-reduce or a rank-local logged loss changes the losses
# by 1e-3 to 1e-1 relative, and one AdamW step moves the student by ~3e-3 and the EMA teacher by ~3e-5.
RTOL = 1e-4
# AdamW divides by sqrt(v): fp32 reduction-order noise in near-zero gradients grows to ~2e-5 in the
# student; without gradient sync the weights differ by ~4e-3, so 1e-4 still catches a missing sync
STUDENT_ATOL, TEACHER_ATOL = 1e-4, 1e-6


def launch(out: Path, nproc: int, strategy: str, *extra: str) -> str:
    """Run `dinolike train` in `nproc` processes (torchrun when > 1); returns the log, asserts success."""
    batch = GLOBAL_BATCH // nproc
    args = ["-m", "dinolike.cli", "train", "--config", str(SMOKE), f"run.output_dir={out}",
            f"data.batch_size={batch}", f"dist.strategy={strategy}", *COMMON, *extra]
    if nproc > 1:  # --standalone: a private rendezvous on a free port, no clash with parallel runs
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-6000:]
    return log


def final_state(out: Path) -> dict:
    return ck.load_checkpoint(ck.list_checkpoints(out / "checkpoints")[-1])


def loss_keys(row: dict) -> list[str]:
    return sorted(k for k in row if k.endswith("loss"))


def assert_losses_match(got: list[dict], ref: list[dict]) -> float:
    """Same iterations, same loss terms, equal within tolerance; returns the max relative difference."""
    by_it = {r["iteration"]: r for r in ref}
    worst = 0.0
    for r in got:
        want = by_it[r["iteration"]]
        assert loss_keys(r) == loss_keys(want)
        for k in loss_keys(r):
            rel = abs(r[k] - want[k]) / abs(want[k])
            worst = max(worst, rel)
            assert rel <= RTOL, f"iteration {r['iteration']} {k}: {r[k]} vs {want[k]} (rel {rel:.2e})"
    return worst


def assert_models_match(a: dict, b: dict) -> None:
    """Student and EMA teacher of two checkpoints agree (plain, full tensors whatever the sharding)."""
    for part, atol in (("student", STUDENT_ATOL), ("teacher", TEACHER_ATOL)):
        sa, sb = a["model"][part], b["model"][part]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert type(sa[k]) is torch.Tensor, f"{part}.{k} is a {type(sa[k]).__name__}, not a plain tensor"
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=atol, msg=lambda m, n=f"{part}.{k}": f"{n}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each run once per module, on demand (a deselected test does not pay for its runs)."""
    root = tmp_path_factory.mktemp("dist")
    done: dict[str, Path] = {}
    timings: dict[str, float] = {}

    def get(name: str) -> Path:
        if name not in done:
            t0 = time.perf_counter()
            nproc, strategy = {"single": (1, "none"), "ddp": (2, "ddp"), "fsdp": (2, "fsdp")}[name]
            out = root / name
            extra = ("dist.activation_checkpointing=true",) if strategy == "fsdp" else ()
            log = launch(out, nproc, strategy, *extra)
            if nproc > 1:
                assert f"world_size={nproc} strategy={strategy}" in log, log[-3000:]
            timings[name] = time.perf_counter() - t0
            done[name] = out
        return done[name]

    get.timings = timings  # type: ignore[attr-defined]
    return get  # type: ignore[return-value]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(runs, strategy: str) -> None:
    single, multi = runs("single"), runs(strategy)
    got, ref = rows(multi), rows(single)
    assert [r["iteration"] for r in got] == list(range(1, ITERS + 1))
    worst = assert_losses_match(got, ref)
    print(f"{strategy}: max relative loss difference {worst:.2e}")
    assert_models_match(final_state(multi), final_state(single))
    # the periodic kNN ran on both ranks (sharded features) and agrees with the single process
    assert abs(got[-1]["knn_top1"] - ref[-1]["knn_top1"]) <= 100 / 64 + 1e-6
    # the checkpoint and the exported backbone hold full tensors, whatever the sharding
    sd = torch.load(multi / "teacher_backbone.pth", weights_only=True)
    ref_sd = torch.load(single / "teacher_backbone.pth", weights_only=True)
    assert sd.keys() == ref_sd.keys()
    for k in sd:
        assert type(sd[k]) is torch.Tensor and sd[k].shape == ref_sd[k].shape, k
        torch.testing.assert_close(sd[k], ref_sd[k], rtol=0, atol=TEACHER_ATOL)
    ckpt = final_state(multi)
    assert len(ckpt["rng_ranks"]) == 2
    assert not torch.equal(ckpt["rng_ranks"][0]["torch"], ckpt["rng_ranks"][1]["torch"])


def _resume_from(src: Path, dst: Path, iteration: int) -> None:
    """Copy checkpoint `iteration`: a single file, or the DCP folder an FSDP run writes."""
    (dst / "checkpoints").mkdir(parents=True)
    path = ck.checkpoint_path(src / "checkpoints", iteration)
    if path.is_file():
        shutil.copy(path, ck.checkpoint_path(dst / "checkpoints", iteration))
    else:
        sharded = ck.checkpoint_path(src / "checkpoints", iteration, sharded=True)
        shutil.copytree(sharded, dst / "checkpoints" / sharded.name)


def test_checkpoint_saved_by_two_fsdp_processes_resumes_in_one(runs, tmp_path: Path) -> None:
    single, fsdp_run = runs("single"), runs("fsdp")
    out = tmp_path / "resumed"
    _resume_from(fsdp_run, out, 2)
    log = launch(out, 1, "none")
    assert "resumed from" in log and "at iteration 2" in log
    got = rows(out)
    assert [r["iteration"] for r in got] == [3, 4]  # continues at the saved iteration, not from 0
    print(f"2 -> 1 resume: max relative loss difference {assert_losses_match(got, rows(single)):.2e}")
    assert_models_match(final_state(out), final_state(single))


def test_checkpoint_saved_by_one_process_resumes_in_two(runs, tmp_path: Path) -> None:
    single = runs("single")
    out = tmp_path / "resumed"
    _resume_from(single, out, 2)
    launch(out, 2, "fsdp")
    got = rows(out)
    assert [r["iteration"] for r in got] == [3, 4]
    print(f"1 -> 2 resume: max relative loss difference {assert_losses_match(got, rows(single)):.2e}")
    assert_models_match(final_state(out), final_state(single))


# ---- init_distributed: which variables mean what --------------------------------------------------
_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
         "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_NNODES")


@pytest.fixture
def fake_group(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record init_process_group calls instead of creating a group."""
    for v in _VARS:
        monkeypatch.delenv(v, raising=False)
    calls: list[dict] = []

    def fake_init(backend: str, **kw) -> None:
        calls.append({"backend": backend, **kw, "addr": os.environ.get("MASTER_ADDR"),
                      "port": os.environ.get("MASTER_PORT")})

    monkeypatch.setattr(torch.distributed, "init_process_group", fake_init)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    return calls


def test_single_process_creates_no_group(fake_group: list[dict]) -> None:
    env = dist.init_distributed("cpu")
    assert (env.rank, env.world_size, env.local_rank, env.enabled, env.is_main) == (0, 1, 0, False, True)
    assert fake_group == []


def test_torchrun_variables(fake_group: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.7",
                 "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}.items():
        monkeypatch.setenv(k, v)
    env = dist.init_distributed("cpu")  # torchrun's variables win over an enclosing SLURM allocation
    assert (env.rank, env.world_size, env.local_rank, env.is_main) == (5, 8, 1, False)
    assert fake_group == [{"backend": "gloo", "rank": 5, "world_size": 8, "addr": "10.0.0.7", "port": "1234"}]


def test_slurm_variables(fake_group: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
                 "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[017-018,020],cpu01"}.items():
        monkeypatch.setenv(k, v)
    env = dist.init_distributed("cpu")
    assert (env.rank, env.world_size, env.local_rank, env.device) == (3, 4, 1, torch.device("cpu"))
    (call,) = fake_group
    assert (call["backend"], call["rank"], call["world_size"]) == ("gloo", 3, 4)
    assert call["addr"] == "gpu017"  # the first node of the allocation hosts the rendezvous
    assert call["port"] == str(dist.slurm_port(4242))  # one job, one port; jobs sharing a node differ
    assert dist.slurm_port(4242) != dist.slurm_port(4243)


def test_slurm_single_node_uses_localhost(fake_group: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NNODES": "1"}.items():
        monkeypatch.setenv(k, v)
    dist.init_distributed("cpu")
    assert fake_group[0]["addr"] == "127.0.0.1" and fake_group[0]["rank"] == 0


@pytest.mark.parametrize(
    "nodelist, first",
    [("node1", "node1"), ("a[3-5]", "a3"), ("gpu[007,009-010]", "gpu007"), ("x-1,y-2", "x-1"),
     ("rack[1-2]-n[04-05]", "rack1-n04")],
)
def test_first_host_of_a_slurm_nodelist(nodelist: str, first: str) -> None:
    assert dist.first_host(nodelist) == first


@pytest.mark.parametrize(
    "env, match",
    [({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2"), ({"RANK": "0", "WORLD_SIZE": "x"}, "WORLD_SIZE"),
     ({"RANK": "1"}, "WORLD_SIZE")],
)
def test_inconsistent_variables_are_a_clear_error(fake_group, monkeypatch, env: dict, match: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        dist.init_distributed("cpu")
    assert fake_group == []
