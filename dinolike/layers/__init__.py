"""Building blocks of the ViT, one concept per file."""

from dinolike.layers.attention import Attention, attention_backend
from dinolike.layers.block import Block, LayerScale
from dinolike.layers.mlp import Mlp, SwiGLUFFN
from dinolike.layers.patch_embed import PatchEmbed

__all__ = ["Attention", "Block", "LayerScale", "Mlp", "PatchEmbed", "SwiGLUFFN", "attention_backend"]
