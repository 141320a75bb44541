"""SSL loss terms: DINO (image level), iBOT (masked patches), KoLeo, and teacher-target normalisation."""

from dinolike.loss.centering import SoftmaxCenter, sinkhorn_knopp
from dinolike.loss.dino import dino_loss
from dinolike.loss.ibot import ibot_loss, ibot_masks_weight
from dinolike.loss.koleo import koleo_loss

__all__ = ["SoftmaxCenter", "dino_loss", "ibot_loss", "ibot_masks_weight", "koleo_loss", "sinkhorn_knopp"]
