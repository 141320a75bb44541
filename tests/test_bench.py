"""`dinolike bench`: synthetic batches are made on the device once (no host work or copy per step), the
real-data mode names the bottleneck, the matmul peak is the best of several sizes, and the step itself
reads nothing back to the host (the GPU would wait there every iteration)."""

from __future__ import annotations

import inspect

import pytest
import torch
from testkit import SMOKE

from dinolike.bench import command, device
from dinolike.config import load_config
from dinolike.training import step as step_module
from dinolike.training.method import Method

TINY = ["model.depth=1", "heads.out_dim=32", "heads.ibot_out_dim=32", "heads.hidden_dim=32",
        "heads.bottleneck_dim=16", "data.batch_size=4", "data.limit=32", "crops.local_number=2"]


@pytest.fixture
def small_peak(monkeypatch):
    """Matmul sizes of a test: milliseconds, not the CPU's real cap of 1024."""
    monkeypatch.setitem(device.PEAK_SIZES, "cpu", (32, 64))


def test_synthetic_bench_copies_no_crops_per_step(monkeypatch, small_peak) -> None:
    """The crops are drawn on the device once: every step gets the very same tensors, nothing moves a
    crop-sized tensor between devices (or anywhere) per step, and the data pipeline is never built.
    Host-made crops per step (made, then `.to(device)` each step) fail these assertions."""
    cfg = load_config(SMOKE, TINY)
    crop_shapes = {(2 * 4, 1, 28, 28), (2 * 4, 1, 14, 14)}  # [2B, C, H, W], [n_local * B, C, h, w]
    moves: list[tuple] = []
    for name in ("to", "copy_", "cuda", "cpu"):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            if tuple(self.shape) in crop_shapes:
                moves.append((_name, tuple(self.shape)))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    seen: list[dict] = []
    real_step = step_module.train_step

    def record(method, opt, batch, *args, **kwargs):
        seen.append(batch)
        return real_step(method, opt, batch, *args, **kwargs)

    monkeypatch.setattr(step_module, "train_step", record)
    to_device = []
    monkeypatch.setattr(Method, "to_device", staticmethod(lambda b, d: to_device.append(1) or b))

    def no_loader(*args, **kwargs):
        raise AssertionError("the synthetic bench built the data loader")

    monkeypatch.setattr("dinolike.training.data.build_train_loader", no_loader)
    res = command.run_bench(cfg, iters=2, warmup=1, synthetic=True)

    assert len(seen) == 1 + 2 + 2  # warmup, phase-timed, back to back
    assert all(b is seen[0] for b in seen)
    assert all(seen[0][k] is seen[-1][k] for k in ("global_crops", "local_crops", "masks"))
    assert seen[0]["global_crops"].device.type == "cpu" and seen[0]["local_crops"].shape == (8, 1, 14, 14)
    assert moves == [] and to_device == []
    assert res["data"].startswith("synthetic") and res["img_per_s"] > 0
    assert res["breakdown_ms"]["data"] < res["breakdown_ms"]["backward"]  # no per-step batch making


def test_real_data_bench_times_loader_and_step_apart(small_peak) -> None:
    cfg = load_config(SMOKE, TINY)
    res = command.run_bench(cfg, iters=2, warmup=1)
    for k in ("img_per_s", "step_img_per_s", "loader_img_per_s"):
        assert res[k] > 0, k
    assert res["bottleneck"] == ("loader" if res["loader_img_per_s"] < res["step_img_per_s"] else "step")
    assert res["attention_kernel"] in ("flash (cpu)", "math")
    assert res["peak_matmul"].startswith(("32^3 float32", "64^3 float32"))


def test_peak_is_the_best_of_several_sizes(monkeypatch) -> None:
    """Each size is timed; the peak returned is the fastest one's, and its size is reported with it."""
    timed_sizes = []
    real_randn = torch.randn

    def randn(*shape, **kwargs):
        timed_sizes.append(shape[0])
        return real_randn(*shape, **kwargs)

    monkeypatch.setattr(torch, "randn", randn)
    flops, n = device.peak_matmul_flops(torch.device("cpu"), torch.float32, (16, 48), min_seconds=0.01)
    assert sorted(set(timed_sizes)) == [16, 48] and n in (16, 48) and flops > 0


def test_attention_kernel_names_what_dispatched() -> None:
    from contextlib import nullcontext

    from dinolike.layers import Attention

    attn, x = Attention(32, 2), torch.randn(2, 5, 32)  # [B, N, D]
    assert device.attention_kernel_that_ran(attn, x, nullcontext()) == "flash (cpu)"
    with device.sdpa_context("math"):
        assert device.attention_kernel_that_ran(attn, x, nullcontext()) == "math"
    with pytest.raises(ValueError, match="--sdpa"):
        device.sdpa_context("fastest")


def test_train_step_reads_nothing_back_to_the_host(monkeypatch) -> None:
    """No `.item()`, `bool(t)`, `float(t)`, `.tolist()`, `.nonzero()` or boolean-mask indexing in the
    step: on a GPU each is a sync that stalls the launch queue every iteration. The one exception is the
    CPU-only precision check of the Sinkhorn-Knopp fast path (`_sinkhorn_by_scaling`, never on CUDA).
    The loss check (`check=`) is a read by design: the loop runs it only at log time on a GPU."""
    from dinolike.bench.batches import synthetic_batch
    from dinolike.training.optim import build_optimizer
    from dinolike.training.schedules import build_schedules
    from dinolike.training.ssl import SSLMethod

    cfg = load_config(SMOKE, TINY)
    torch.manual_seed(0)
    method = SSLMethod(cfg)
    opt = build_optimizer(method.param_groups(), cfg.optim.betas, cfg.optim.fused)
    batch = synthetic_batch(cfg, 4, torch.device("cpu"))
    sched = build_schedules(cfg, 4)
    reads: list[str] = []

    def watch(name: str, real):
        def spy(self, *args, **kwargs):
            caller = inspect.stack()[1].function
            bool_index = name == "__getitem__" and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.bool
            if (name != "__getitem__" or bool_index) and caller != "_sinkhorn_by_scaling":
                reads.append(f"{name} in {caller}")
            return real(self, *args, **kwargs)

        return spy

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "__getitem__"):
        monkeypatch.setattr(torch.Tensor, name, watch(name, getattr(torch.Tensor, name)))
    for it in range(2):
        metrics = step_module.train_step(method, opt, batch, sched.at(it), torch.device("cpu"),
                                         method.grad_clip_groups())
    monkeypatch.undo()
    assert reads == []
    assert torch.isfinite(metrics["loss"])


def test_bench_failures_are_one_line_errors(capsys) -> None:
    """A kernel that cannot run here (cuDNN attention on a CPU) or a bad value: one line, no traceback."""
    from dinolike.commands.bench import main

    smoke = str(SMOKE)
    assert main(["--config", smoke, "--synthetic", "--iters", "1", "--warmup", "0", "--sdpa", "cudnn"]) == 1
    err = capsys.readouterr().err
    assert "dinolike bench: error: No viable backend" in err and "Traceback" not in err
    assert main(["--config", smoke, "--iters", "1", "precision.cuda=fp16"]) == 2
    assert "precision.cuda must be one of" in capsys.readouterr().err
