"""The optimised SSL step (batched crops, one head call over CLS + masked patches, scaling-vector
Sinkhorn, fused AdamW, foreach clip and EMA, optionally compiled blocks and heads) computes the same
losses and updated weights as a straightforward step written out here: one forward per crop, one head
call per crop and token kind, a python loop over (student, teacher) crop pairs, the plain
exp-normalise Sinkhorn, per-sample KoLeo, single-tensor AdamW, per-parameter clip and EMA.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from dinolike.config import load_config
from dinolike.dist import DistEnv
from dinolike.loss import sinkhorn_knopp
from dinolike.loss.centering import _sinkhorn_by_scaling
from dinolike.training.data import build_train_loader
from dinolike.training.optim import build_optimizer
from dinolike.training.ssl import SSLMethod, compile_step_modules
from dinolike.training.step import train_step

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "fmnist_cpu.yaml"
OVERRIDES = [
    "model.arch=vit_pico", "heads.out_dim=64", "heads.ibot_out_dim=64", "heads.hidden_dim=48",
    "heads.bottleneck_dim=16", "data.batch_size=6", "data.num_workers=0", "data.limit=64",
    "crops.local_number=2", "model.drop_path_rate=0.0", "masking.probability=0.5", "run.progress=false",
    "model.layerscale=0.1",  # with 1e-5 every image has the same CLS token at init: KoLeo is ill-posed
    "precision.cpu=fp32",  # fp32 on any CPU (the recipe says auto): the references are fp32
]
# lr, wd, momentum as mid-training (last layer not frozen); teacher temperature at its warmup value
SCHED = [
    {"lr": 2e-3, "last_layer_lr": 2e-3, "wd": 0.05, "momentum": 0.9, "teacher_temp": 0.04},
    {"lr": 1e-3, "last_layer_lr": 1e-3, "wd": 0.06, "momentum": 0.95, "teacher_temp": 0.05},
]


# ----------------------------------------------------------------------------- the straightforward step


def ref_sinkhorn(logits: torch.Tensor, temp: float, n_iters: int = 3) -> torch.Tensor:
    """SwAV's plain version in float64: exponentiate, then alternately normalise prototypes and samples."""
    q = torch.exp(logits.double() / temp).T  # [K, N]; safe: |logits| <= 1 (unit features, |g| ~ 1)
    q = q / q.sum()
    n_protos, n = q.shape
    for _ in range(n_iters):
        q = q / (q.sum(dim=1, keepdim=True) * n_protos)
        q = q / (q.sum(dim=0, keepdim=True) * n)
    return (q * n).T.float()  # [N, K]


def ref_koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    x = F.normalize(x, dim=-1)
    terms = []
    for i in range(x.shape[0]):
        others = [j for j in range(x.shape[0]) if j != i]
        j = max(others, key=lambda j: float(x[i].detach() @ x[j].detach()))
        terms.append(-torch.log(torch.linalg.vector_norm(x[i] - x[j]) + eps))
    return torch.stack(terms).mean()


def ref_losses(cfg, student, teacher, batch: dict, temp: float) -> dict[str, torch.Tensor]:
    """Per-crop forwards, per-pair DINO loop, per-crop iBOT means; DINOv2's loss weighting."""
    B = batch["batch_size"]
    g, loc, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
    n_local = loc.shape[0] // B
    tau = cfg.loss.student_temp
    with torch.no_grad():
        t_cls, t_patch = [], []
        for c in range(2):
            out = teacher["backbone"].forward_features(g[c * B : (c + 1) * B])
            t_cls.append(teacher["dino_head"](out["x_norm_clstoken"]))  # [B, K]
            t_patch.append(teacher["dino_head"](out["x_norm_patchtokens"][masks[c * B : (c + 1) * B]]))
        t_dino = ref_sinkhorn(torch.cat(t_cls), temp).view(2, B, -1)  # [2, B, K]
        t_ibot = ref_sinkhorn(torch.cat(t_patch), temp)  # [M, K]
    s_logits, s_patch, s_cls_global = [], [], []
    for c in range(2):
        out = student["backbone"].forward_features(g[c * B : (c + 1) * B], masks=masks[c * B : (c + 1) * B])
        s_cls_global.append(out["x_norm_clstoken"])
        s_logits.append(student["dino_head"](out["x_norm_clstoken"]))
        s_patch.append(student["dino_head"](out["x_norm_patchtokens"][masks[c * B : (c + 1) * B]]))
    for c in range(n_local):
        out = student["backbone"].forward_features(loc[c * B : (c + 1) * B])
        s_logits.append(student["dino_head"](out["x_norm_clstoken"]))

    total, n_pairs = 0.0, 0
    for s, logits in enumerate(s_logits):
        log_p = F.log_softmax(logits / tau, dim=-1)  # [B, K]
        for t in range(2):
            if s == t:
                continue
            ce = -(t_dino[t] * log_p).sum(dim=-1).mean()
            total = total + ce * (2 if s < 2 else 1)  # DINOv2 counts the global pairs twice
            n_pairs += 1
    dino = total / n_pairs

    ibot, start = 0.0, 0
    patch_logits = torch.cat(s_patch)  # [M, K], crop-major like the targets
    for crop in range(2 * B):
        n_masked = int(masks[crop].sum())
        if n_masked:
            log_p = F.log_softmax(patch_logits[start : start + n_masked] / tau, dim=-1)
            ibot = ibot + (-(t_ibot[start : start + n_masked] * log_p).sum(dim=-1)).mean()
        start += n_masked
    ibot = ibot / (2 * B)
    koleo = ref_koleo(s_cls_global[0]) + ref_koleo(s_cls_global[1])
    lc = cfg.loss
    loss = lc.dino_weight * dino + lc.ibot_weight * ibot + lc.koleo_weight * koleo
    return {"loss": loss, "ibot_loss": ibot, "koleo_loss": koleo}


def ref_step(method: SSLMethod, opt: torch.optim.Optimizer, batch: dict, s: dict) -> dict:
    losses = ref_losses(method.cfg, method.student, method.teacher, batch, s["teacher_temp"])
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
    scale = min(1.0, method.cfg.optim.clip_grad / (norm + 1e-6))
    for p in params:
        p.grad.mul_(scale)
    _schedule(opt, s)
    opt.step()
    with torch.no_grad():
        for t, p in zip(method.teacher.parameters(), method.student.parameters(), strict=True):
            t.copy_(s["momentum"] * t + (1 - s["momentum"]) * p)
    return {k: v.detach() for k, v in losses.items()}


# ----------------------------------------------------------------------------- the optimised step


def fast_step(method: SSLMethod, opt: torch.optim.Optimizer, batch: dict, s: dict) -> dict:
    """The step the loop runs (and dinolike bench times): dinolike.training.step.train_step itself."""
    metrics = train_step(method, opt, batch, s, torch.device("cpu"), method.grad_clip_groups())
    return {k: v.detach() for k, v in metrics.items()}


def _schedule(opt: torch.optim.Optimizer, s: dict) -> None:
    for g in opt.param_groups:
        g["lr"] = (s["last_layer_lr"] if g["is_last_layer"] else s["lr"]) * g["lr_mult"]
        g["weight_decay"] = s["wd"] * g["wd_mult"]


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(CONFIG, OVERRIDES)
    loader = iter(build_train_loader(cfg, DistEnv(0, 1, 0, torch.device("cpu")), start_position=0))
    batches = [next(loader), next(loader)]
    assert all(b["batch_size"] == 6 and b["n_masked"] > 0 for b in batches)
    torch.manual_seed(0)
    method = SSLMethod(cfg)
    with torch.no_grad():  # a trained-looking head: prototype norms spread around 1
        for m in (method.student, method.teacher):
            m["dino_head"].last_layer.weight_g.copy_(torch.linspace(0.8, 1.2, 64)[:, None])
    return cfg, method, batches


def _run(method: SSLMethod, batches: list[dict], reference: bool, backend: str | None = None,
         checkpointing: str = "none"):
    method = copy.deepcopy(method)
    compiled = backend is not None
    method.student["backbone"].set_activation_checkpointing(checkpointing)
    if compiled:
        torch._dynamo.reset()
        counters.clear()
        assert compile_step_modules(method, backend=backend) == 2 * (method.cfg.model.depth or 4) + 2
    groups = method.param_groups()
    if reference:
        opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=0.0,
                                betas=tuple(method.cfg.optim.betas), foreach=False, fused=False)
    else:
        opt = build_optimizer(groups, method.cfg.optim.betas, method.cfg.optim.fused)
    step = ref_step if reference else fast_step
    losses = [step(method, opt, b, s) for b, s in zip(batches, SCHED, strict=True)]
    if compiled:
        # 12 block calls a step (4 blocks x student global, student local, teacher global): one static graph
        # per crop size and mode, shared by every block, and at most 2 per head call (the masked-patch rows
        # change per batch: static, then dynamic), over both steps
        assert counters["stats"]["unique_graphs"] <= 3 + 2 * 2, dict(counters["stats"])
    return losses, method


# aot_eager: dynamo's graphs and AOT autograd (what inductor receives), without C++ codegen (seconds);
# inductor: the generated C++ kernels too (what `run.compile` runs; about a minute of compiling on 2 cores);
# with the MLP branch recomputed in backward (selective activation checkpointing) inside the compiled block
@pytest.mark.parametrize(("backend", "checkpointing"),
                         [(None, "none"), ("aot_eager", "none"), ("aot_eager", "mlp"), ("inductor", "none")],
                         ids=["eager", "compiled", "compiled-ckpt-mlp", "inductor"])
def test_optimised_step_matches_straightforward_step(setup, backend: str | None, checkpointing: str) -> None:
    cfg, method, batches = setup
    ref_losses_, ref_method = _run(method, batches, reference=True)
    fast_losses, fast_method = _run(method, batches, reference=False, backend=backend, checkpointing=checkpointing)
    for ref, fast in zip(ref_losses_, fast_losses, strict=True):
        for k in ("loss", "ibot_loss", "koleo_loss"):
            torch.testing.assert_close(fast[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    # the second step's loss depends on the first update of both networks: both were the same
    assert not torch.allclose(ref_losses_[0]["loss"], ref_losses_[1]["loss"])
    for part in ("student", "teacher"):
        ref_sd = getattr(ref_method, part).state_dict()
        fast_sd = getattr(fast_method, part).state_dict()
        assert list(fast_sd) == list(ref_sd)  # compiling keeps the keys
        start_sd = getattr(method, part).state_dict()
        for k, v in ref_sd.items():
            assert not torch.equal(v, start_sd[k]) or k.endswith("mask_token"), f"{part}.{k} never moved"
            # Adam moves each weight by ~lr per step whatever the gradient's size: compare at 1 % of that
            torch.testing.assert_close(fast_sd[k], v, rtol=0, atol=2e-5, msg=f"{part}.{k}")


def test_scaling_sinkhorn_matches_log_domain_and_hands_over() -> None:
    torch.manual_seed(1)
    feats = F.normalize(torch.randn(300, 32), dim=-1)
    protos = F.normalize(torch.randn(128, 32), dim=-1) * torch.linspace(0.5, 3.0, 128)[:, None]
    logits = feats @ protos.T  # [300, 128], spread like a trained head's
    for temp in (0.04, 0.07, 0.2):
        fast = sinkhorn_knopp(logits, temp, fast=True)
        log_domain = sinkhorn_knopp(logits, temp, fast=False)
        torch.testing.assert_close(fast, log_domain, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fast, ref_sinkhorn(logits, temp), rtol=1e-4, atol=1e-6)
        assert _sinkhorn_by_scaling(logits.double() / temp, 3, torch.tensor(300.0)) is not None
    # a sample far below every prototype's best one: its whole row underflows in float32 exponentials,
    # so the fast path declines and the log domain gives the answer
    far = logits.clone()
    far[7] -= 20.0
    assert _sinkhorn_by_scaling(far / 0.04, 3, torch.tensor(300.0)) is None
    q = sinkhorn_knopp(far, 0.04)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(300))
    torch.testing.assert_close(q, sinkhorn_knopp(far.double(), 0.04).float(), rtol=1e-3, atol=1e-6)


def test_compile_mode_reaches_the_blocks_only(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run.compile_mode=reduce-overhead` (CUDA graphs) goes to the static-shape blocks; the heads, whose
    rows change every batch, keep the default mode (a graph per row count would re-record each step)."""
    from dinolike.layers import Block

    calls: list[tuple[type, dict]] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((type(self), kw)))
    _, method, _ = setup
    n = compile_step_modules(copy.deepcopy(method), block_mode="reduce-overhead")
    assert n == len(calls) == 2 * 4 + 2
    for typ, kw in calls:
        if typ is Block:
            assert kw == {"dynamic": False, "mode": "reduce-overhead"}
        else:
            assert "mode" not in kw and "dynamic" not in kw
