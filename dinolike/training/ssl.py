"""The DINOv2 pretraining method: student (backbone + heads) against an EMA teacher.

A method is what the one training loop drives: `param_groups()`, `forward_loss(batch, sched) ->
(loss, metrics)`, `after_step(sched)` and `kept_backbone()`. Distillation is another method
(`distill.py`); the high-res phase is this method with another config and a checkpoint to start from.
"""

from __future__ import annotations

import copy

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dinolike.eval.spread import mean_pairwise_cosine
from dinolike.loss import SoftmaxCenter, dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp
from dinolike.models import DINOHead, VisionTransformer, build_backbone
from dinolike.training.method import Method, Phase, untimed
from dinolike.training.optim import param_groups


def build_student(cfg: DictConfig, model_cfg: DictConfig | None = None) -> nn.ModuleDict:
    """Backbone + DINO head (+ untied iBOT head): keys `backbone.`, `dino_head.`, `ibot_head.` as in the
    official training checkpoints."""
    backbone = build_backbone(model_cfg if model_cfg is not None else cfg.model)
    h = cfg.heads
    parts: dict[str, nn.Module] = {
        "backbone": backbone,
        "dino_head": DINOHead(backbone.embed_dim, h.out_dim, h.hidden_dim, h.bottleneck_dim, h.nlayers),
    }
    if h.ibot_separate_head:
        parts["ibot_head"] = DINOHead(backbone.embed_dim, h.ibot_out_dim, h.hidden_dim, h.bottleneck_dim, h.nlayers)
    return nn.ModuleDict(parts)


def compile_step_modules(root: nn.Module, block_mode: str = "default", **compile_kwargs) -> int:
    """`run.compile`: compile every transformer block and projection head under `root`, in place.

    `module.compile()` keeps the module (and so the state-dict keys, FSDP units and EMA pairing) and
    only swaps its call for the compiled one; the glue between them (crop lists, masks, losses) stays
    eager. Blocks compile with static shapes: one specialised graph per crop size and mode (student
    global, student local, teacher global), which every block of the same width reuses, so depth costs
    no compile time and the second crop size does not turn the first graph symbolic (torch's default
    recompiles with dynamic shapes on a second size). Heads keep torch's automatic dynamic shapes: their
    rows (CLS + masked patches) change every batch, and a static head would recompile each time. The
    recompile limit per code object (8 by default, past which dynamo silently runs eager) is raised to
    8 per distinct module shape, since students of several widths share `Block.forward`. Returns the
    number of modules compiled.

    block_mode (`run.compile_mode`): torch.compile's mode for the blocks only. "reduce-overhead" captures
    each static block graph in a CUDA graph (replayed without per-kernel launches, on CUDA only); heads
    stay in the default mode, since a graph per row count would be recorded every batch.
    """
    import torch._dynamo.config as dynamo_config

    from dinolike.layers import Block

    n, shapes = 0, set()
    for m in root.modules():
        if isinstance(m, (Block, DINOHead)):
            block = {"dynamic": False} | ({"mode": block_mode} if block_mode != "default" else {})
            kwargs = (block if isinstance(m, Block) else {}) | compile_kwargs
            m.compile(**kwargs)
            shapes.add((type(m), tuple(tuple(p.shape) for p in m.parameters())))
            n += 1
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 8 * len(shapes)))
    return n


class SSLTargets(nn.Module):
    """Teacher logits -> target distributions (Sinkhorn-Knopp or softmax with an EMA centre)."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.mode = cfg.loss.centering
        if self.mode not in ("sinkhorn_knopp", "softmax"):
            raise ValueError(f"loss.centering must be sinkhorn_knopp or softmax, got {self.mode!r}")
        h = cfg.heads
        self.dino_center = SoftmaxCenter(h.out_dim, cfg.loss.center_momentum)
        self.ibot_center = SoftmaxCenter(h.ibot_out_dim if h.ibot_separate_head else h.out_dim,
                                         cfg.loss.center_momentum)

    def dino(self, logits: Tensor, temp: float) -> Tensor:
        return self._targets(logits, temp, self.dino_center)

    def ibot(self, logits: Tensor, temp: float, n_total: Tensor | int | None = None) -> Tensor:
        return self._targets(logits, temp, self.ibot_center, n_total)

    def _targets(self, logits: Tensor, temp: float, center: SoftmaxCenter, n_total=None) -> Tensor:
        if self.mode == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp, n_iters=3, n_rows_total=n_total)
        probs = center.probs(logits, temp)
        center.update(logits)
        return probs


def head_logits(parts: nn.ModuleDict, cls: Tensor, patches: Tensor,
                use_ibot: bool) -> tuple[Tensor, Tensor | None]:
    """The heads of a student or teacher over CLS tokens [N, D] and masked patch tokens [M, D].

    Tied iBOT head: one DINO-head call over every token that needs it (one launch instead of two);
    untied: each head on its tokens. Returns (cls logits [N, K], patch logits [M, K] or None).
    """
    if use_ibot and "ibot_head" not in parts:
        logits = parts["dino_head"](torch.cat([cls, patches]))  # [N + M, K]
        return logits[: cls.shape[0]], logits[cls.shape[0] :]
    return parts["dino_head"](cls), parts["ibot_head"](patches) if use_ibot else None


@torch.no_grad()
def teacher_targets(teacher: nn.ModuleDict, targets: SSLTargets, batch: dict, temp: float,
                    use_ibot: bool) -> dict[str, Tensor]:
    """Target distributions of the teacher's global crops: `dino` [2B, K] and, with iBOT, `ibot` [M, K]
    at the masked patches, and the teacher's CLS embeddings `cls` [2B, D]. Shared by pretraining (EMA
    teacher) and distillation (frozen teacher)."""
    teacher.eval()
    out = teacher["backbone"].forward_features(batch["global_crops_teacher"])
    cls = out["x_norm_clstoken"]  # [2B, D]
    patches = out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices"]]  # [M, D]
    cls_logits, patch_logits = head_logits(teacher, cls, patches, use_ibot)
    result = {"dino": targets.dino(cls_logits.float(), temp), "cls": cls}
    if use_ibot:
        result["ibot"] = targets.ibot(patch_logits.float(), temp)
    return result


def ssl_loss_terms(
    cfg: DictConfig,
    student: nn.ModuleDict,
    teacher_out: dict[str, Tensor],
    batch: dict,
) -> tuple[Tensor, dict[str, float]]:
    """DINO (local and global crops), iBOT and KoLeo losses of `student` against teacher targets.

    teacher_out: `dino` [2B, K] target probabilities of the teacher's global crops (crop-major) and
    `ibot` [M, K] targets at the masked patches. Shared by pretraining and distillation.
    """
    lc = cfg.loss
    g, loc = batch["global_crops"], batch["local_crops"]
    B = g.shape[0] // 2
    n_local = 0 if loc is None else loc.shape[0] // B
    crops = [g] if loc is None else [g, loc]
    masks = [batch["masks"]] + ([None] if loc is not None else [])
    outs = student["backbone"].forward_features(crops, masks=masks)
    g_cls = outs[0]["x_norm_clstoken"]  # [2B, D]
    cls = torch.cat([g_cls] + ([outs[1]["x_norm_clstoken"]] if n_local else []))  # [(2 + n_local) B, D]
    patches = outs[0]["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices"]]  # [M, D]
    use_ibot = lc.ibot_weight > 0
    cls_logits, patch_logits = head_logits(student, cls, patches, use_ibot)  # [(2 + n_local) B, K], [M, K]
    K = cls_logits.shape[-1]
    t_dino = teacher_out["dino"].view(2, B, -1)  # [2, B, K]
    metrics: dict[str, Tensor] = {}
    total = cls_logits.new_zeros(())
    if lc.dino_weight > 0:
        glob = dino_loss(cls_logits[: 2 * B].view(2, B, K), t_dino, lc.student_temp, ignore_diagonal=True)
        metrics["dino_global_loss"] = glob
        pairs_local = 2 * n_local
        if n_local:
            local = dino_loss(cls_logits[2 * B :].view(n_local, B, K), t_dino, lc.student_temp)
            metrics["dino_local_loss"] = local
        else:
            local = glob.new_zeros(())
        # every crop pair weighs the same (DINOv2 also doubles the 2 global pairs)
        dino = (local * pairs_local + glob * 2 * 2) / (pairs_local + 2)
        total = total + lc.dino_weight * dino
    if use_ibot:
        ib = ibot_loss(patch_logits, teacher_out["ibot"], batch["masks_weight"], 2 * B, lc.student_temp)
        metrics["ibot_loss"] = ib
        total = total + lc.ibot_weight * ib
    if lc.koleo_weight > 0:
        ko = sum(koleo_loss(c) for c in g_cls.chunk(2))  # per global crop, per rank
        metrics["koleo_loss"] = ko
        total = total + lc.koleo_weight * ko
    metrics.update(collapse_signals(cls_logits[: 2 * B], teacher_out["dino"], lc.student_temp, g_cls[:B]))
    metrics["loss"] = total
    return total, metrics


@torch.no_grad()
def collapse_signals(student_logits: Tensor, teacher_probs: Tensor, student_temp: float,
                     cls: Tensor | None = None) -> dict[str, Tensor]:
    """What the collapse watch reads (nats; ln K is uniform over K prototypes), from tensors the step has.

    `teacher_entropy`: mean entropy of one image's target. Near ln K: every target is uniform, the
    teacher no longer tells images apart (with Sinkhorn-Knopp, the signature of features that all look
    alike). `student_mean_entropy`: entropy of the batch-mean student prediction. Near 0: every image
    goes to the same few prototypes (the collapse softmax centring can fall into). `cls_cosine` (when
    `cls` [B, D], the student's CLS embeddings of B different images, is given and B >= 2): their mean
    pairwise cosine. Near 1: every image gets the same embedding, whatever the heads do (LayerScale 1e-5
    at initialisation; eval/spread.py). Pretraining replaces it with its teacher's, the model it keeps.
    student_logits [2B, K] (global crops), teacher_probs [2B, K].
    """
    t = teacher_probs.float()
    teacher_h = -torch.special.xlogy(t, t).sum(-1).mean()  # []
    mean_p = torch.softmax(student_logits.detach().float() / student_temp, dim=-1).mean(0)  # [K]
    student_h = -torch.special.xlogy(mean_p, mean_p).sum()  # []
    out = {"teacher_entropy": teacher_h, "student_mean_entropy": student_h}
    if cls is not None and cls.shape[0] >= 2:
        out["cls_cosine"] = mean_pairwise_cosine(cls)
    return out


class SSLMethod(Method):
    """DINOv2 pretraining: the teacher is an EMA of the student and is what we keep."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = build_student(cfg)
        if cfg.model.pretrained_weights:  # continued pretraining: the teacher starts there too
            from dinolike.interop.official import load_backbone_weights

            load_backbone_weights(self.student["backbone"], cfg.model.pretrained_weights)
        self.teacher = copy.deepcopy(self.student)
        for m in self.teacher.modules():  # the teacher never drops paths
            if hasattr(m, "drop_path"):
                m.drop_path = 0.0
        self.teacher.requires_grad_(False)
        self.targets = SSLTargets(cfg)

    def param_groups(self) -> list[dict]:
        o = self.cfg.optim
        return param_groups(self.student, self.student["backbone"].n_blocks, o.layerwise_decay,
                            o.patch_embed_lr_mult)

    def forward_loss(self, batch: dict, sched: dict[str, float], phase: Phase = untimed) -> tuple[Tensor, dict]:
        self.student.train()
        with phase("teacher_forward"):
            t_out = teacher_targets(self.teacher, self.targets, batch, sched["teacher_temp"],
                                    self.cfg.loss.ibot_weight > 0)
        with phase("student_forward_and_losses"):
            loss, metrics = ssl_loss_terms(self.cfg, self.student, t_out, batch)
        # the collapse watch judges the model the run keeps: the EMA teacher can stay constant while KoLeo
        # already pushes the student's embeddings apart (measured: 0.17 for the student, 1.0 for the teacher)
        B = batch["global_crops"].shape[0] // 2
        if B >= 2:
            metrics["cls_cosine"] = mean_pairwise_cosine(t_out["cls"][:B])
        return loss, metrics

    @torch.no_grad()
    def after_step(self, sched: dict[str, float]) -> None:
        """teacher <- m * teacher + (1 - m) * student, on whatever (local shard) tensors the params hold."""
        t = [p for p in self.teacher.parameters()]
        s = [p.detach() for p in self.student.parameters()]
        torch._foreach_lerp_(t, s, 1.0 - sched["momentum"])

    def kept_backbone(self) -> VisionTransformer:
        return self.teacher["backbone"]

    def sharded_parts(self) -> list[nn.ModuleDict]:
        return [self.student, self.teacher]

    def checkpointed_parts(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher, "targets": self.targets}
