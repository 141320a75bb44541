"""`precision.cpu`: the CPU step under bf16 autocast trains the same thing as the fp32 step.

On a real Fashion-MNIST batch of the main job's recipe, the bf16 step's losses and gradients match the
fp32 step's within bf16's rounding, the matmuls really run in bf16, and attention stays in fp32 (its bf16
CPU kernel is the slow part of the backward).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dinolike.config import ConfigError, load_config
from dinolike.dist import DistEnv
from dinolike.layers.attention import _sdpa
from dinolike.training.data import build_batch_mover, build_train_loader
from dinolike.training.optim import build_optimizer
from dinolike.training.schedules import build_schedules
from dinolike.training.ssl import SSLMethod
from dinolike.training.step import autocast, train_step
from dinolike.training.validate import check_train_config

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "fmnist_cpu.yaml"
CPU = torch.device("cpu")
# the main job's model, heads and crops; a smaller batch and dataset so the test takes seconds
OVERRIDES = ["dist.local_processes=1", "data.batch_size=16", "data.limit=256", "run.progress=false",
             "precision.cpu=fp32"]  # fp32, the reference: the recipe says auto


def _steps(cfg, method: SSLMethod, batches: list[dict]) -> tuple[list[dict], list[torch.Tensor]]:
    """Train a copy of `method` on `batches` with the schedule of mid-warmup; the metrics of each step and
    the gradients of the first."""
    method = copy.deepcopy(method)
    method.cfg = cfg  # the step reads precision.cpu from the method's config
    opt = build_optimizer(method.param_groups(), cfg.optim.betas, cfg.optim.fused)
    clip = method.grad_clip_groups()
    sched = build_schedules(cfg, cfg.data.batch_size)
    metrics, grads = [], []
    for i, batch in enumerate(batches):
        metrics.append(train_step(method, opt, batch, sched.at(300 + i), CPU, clip))
        if i == 0:
            grads = [p.grad.detach().clone() for p in method.student.parameters() if p.grad is not None]
    return metrics, grads


@pytest.fixture(scope="module")
def real_batches() -> tuple:
    cfg = load_config(CONFIG, OVERRIDES)
    loader = iter(build_train_loader(cfg, DistEnv(0, 1, 0, CPU), start_position=0))
    move = build_batch_mover(cfg, CPU)  # the photometric half of the augmentation, as in training
    batches = [move(next(loader)) for _ in range(3)]
    torch.manual_seed(0)
    return cfg, SSLMethod(cfg), batches


def test_bf16_step_matches_fp32_step(real_batches) -> None:
    cfg, method, batches = real_batches
    cfg_bf16 = load_config(CONFIG, [*OVERRIDES, "precision.cpu=bf16"])
    ref, ref_grads = _steps(cfg, method, batches)
    got, grads = _steps(cfg_bf16, method, batches)
    for r, g in zip(ref, got, strict=True):
        for k in ("loss", "dino_global_loss", "dino_local_loss", "ibot_loss", "koleo_loss"):
            # bf16 keeps 8 bits of mantissa (relative rounding 2**-9 = 0.2 %) through 4 blocks and a 3-layer
            # head; the losses are fp32 reductions of those logits (measured: at most 0.25 % apart)
            torch.testing.assert_close(g[k], r[k], rtol=5e-3, atol=5e-3, msg=k)
    assert any(not torch.equal(r["loss"], g["loss"]) for r, g in zip(ref, got, strict=True)), \
        "bf16 step equals the fp32 step bit for bit: autocast did not run"
    flat_ref = torch.cat([x.flatten() for x in ref_grads])
    flat = torch.cat([x.flatten() for x in grads])
    assert torch.isfinite(flat).all()
    assert F.cosine_similarity(flat, flat_ref, dim=0) > 0.999  # the same descent direction (measured: 0.9999)
    assert 0.98 < flat.norm() / flat_ref.norm() < 1.02


def test_cpu_bf16_autocasts_matmuls_not_attention(real_batches) -> None:
    cfg, method, batches = real_batches
    on = load_config(CONFIG, [*OVERRIDES, "precision.cpu=bf16"])
    seen: dict[str, torch.dtype] = {}
    block = method.student["backbone"].blocks[0]
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: seen.update({name: out.dtype}))
             for name, m in (("qkv", block.attn.qkv), ("fc1", block.mlp.fc1))]
    try:
        with autocast(CPU, on.precision):
            method.student["backbone"].forward_features(batches[0]["global_crops"])
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"qkv": torch.bfloat16, "fc1": torch.bfloat16}
    with autocast(CPU, cfg.precision):  # the default: fp32, no autocast
        assert not torch.is_autocast_enabled("cpu")

    q, k, v = torch.randn(3, 4, 3, 17, 32).bfloat16().unbind(0)  # [B, H, N, hd], as the linear made them
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _sdpa(q, k, v)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float()))


def test_cpu_bf16_is_refused_on_cuda() -> None:
    cfg = load_config(CONFIG, ["precision.cpu=bf16", "run.device=cuda"])
    with pytest.raises(ConfigError, match="precision.cpu applies to CPU runs only"):
        check_train_config(cfg)
    check_train_config(load_config(CONFIG, ["precision.cpu=bf16"]))  # on the CPU recipe it is fine



def test_cpu_bf16_auto_follows_the_cpu(monkeypatch) -> None:
    """`auto` turns bf16 on exactly where the CPU has bf16 instructions, and the start summary says
    which precision the run uses (it used to print fp32 whatever the setting)."""
    from dinolike.training import step
    from dinolike.training.summary import estimate_line, start_lines

    cfg = load_config(CONFIG, ["precision.cpu=auto"])
    check_train_config(cfg)
    check_train_config(load_config(CONFIG, ["precision.cpu=auto", "run.device=cuda"]))  # ignored on a GPU
    with pytest.raises(ConfigError, match="precision.cpu"):
        check_train_config(load_config(CONFIG, ["precision.cpu=maybe"]))
    backbone = torch.nn.Linear(2, 2)
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        step.native_cpu_bf16.cache_clear()  # asked once per process: ask again for the patched CPU
        assert step.cpu_bf16(cfg.precision) is native
        with autocast(CPU, cfg.precision):
            y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))  # [2, 3]
        assert y.dtype == (torch.bfloat16 if native else torch.float32)
        lines = start_lines(cfg, out="o", how="new run", images=10, world=1, device=CPU, backbone=backbone,
                            heads=None, start=0, total=5)
        device_line = next(line for line in lines if line.strip().startswith("device"))
        assert ("bf16 autocast" in device_line) is native and ("fp32" in device_line) is not native
        estimate = estimate_line(cfg, CPU, 2, 0.5, (1, 3), 5)  # the measured estimate names its case too
        assert ("bf16 autocast" in estimate) is native and ("fp32" in estimate) is not native, estimate
    step.native_cpu_bf16.cache_clear()  # the real CPU again for the tests after this one
    for fixed in (True, False):  # bf16 / fp32 do not look at the CPU
        value = "bf16" if fixed else "fp32"
        assert step.cpu_bf16(load_config(CONFIG, [f"precision.cpu={value}"]).precision) is fixed
