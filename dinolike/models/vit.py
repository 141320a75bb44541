"""The one configurable Vision Transformer, with the official DINOv2 backbone's state-dict keys.

Keys: `cls_token`, `pos_embed`, `register_tokens`, `mask_token`, `patch_embed.proj.*`,
`blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1|w12,mlp.fc2|w3,ls2.gamma}.*`, `norm.*`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinolike.layers import Block, PatchEmbed
from dinolike.layers.block import CHECKPOINT_SCOPES

# name -> (embed_dim, depth, num_heads, ffn_layer); patch size, registers etc. come from the config.
PRESETS: dict[str, tuple[int, int, int, str]] = {
    "vit_pico": (96, 4, 3, "mlp"),  # CPU recipes on 28 px images
    "vit_nano": (128, 6, 4, "mlp"),
    "vit_tiny": (192, 12, 3, "mlp"),
    "vit_small": (384, 12, 6, "mlp"),
    "vit_base": (768, 12, 12, "mlp"),
    "vit_large": (1024, 24, 16, "mlp"),
    "vit_giant2": (1536, 40, 24, "swiglu"),
}


def grid_pos_embed(pos_embed: Tensor, h: int, w: int, offset: float = 0.1, antialias: bool = False) -> Tensor:
    """[1, 1 + m*m, D] -> [1, 1 + h*w, D] (fp32): the square grid resized bicubically, CLS position kept.
    `offset`: DINOv2's scale factor (h + offset) / m; 0: resize to the exact size. Shared with the exports,
    which store the grid a run was evaluated at (timm cannot resize the way the model does)."""
    pos = pos_embed.float()
    n = pos.shape[1] - 1
    m = int(math.sqrt(n))
    if m * m != n:
        raise ValueError(f"pos_embed holds {n} patch positions, not a square grid")
    if (h, w) == (m, m):
        return pos
    grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)  # [1, D, m, m]
    if offset:
        scale = ((h + offset) / m, (w + offset) / m)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=antialias)
    if grid.shape[-2:] != (h, w):
        raise RuntimeError(f"position grid resized to {tuple(grid.shape[-2:])}, expected {(h, w)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)  # [1, h*w, D]
    return torch.cat([pos[:, :1], grid], dim=1)


class VisionTransformer(nn.Module):
    """Pre-norm ViT: patch tokens + CLS (+ registers), learned position embedding resized on the fly.

    Args:
        img_size: size the position embedding is learned for (it is interpolated for other sizes).
        patch_size: side of a square patch, any integer (14/16 for photos, 4 or 7 for 28 px images).
        in_chans: 3 for RGB, 1 for grayscale data.
        n_registers: extra learned tokens (DINOv2 "with registers"); they see attention but are not patches.
        drop_path_rate: stochastic depth, uniform over blocks as in DINOv2 (`drop_path_uniform`).
        interpolate_offset: DINOv2 resizes the position grid with scale factor (new + offset) / old;
            0 resizes to the exact size instead (what timm does).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        layerscale: float | None = 1e-5,
        drop_path_rate: float = 0.0,
        n_registers: int = 0,
        qkv_bias: bool = True,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.n_blocks = depth
        self.num_register_tokens = n_registers
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, n_registers, embed_dim)) if n_registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, ffn_layer, layerscale, drop_path_rate, qkv_bias)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()  # the official backbone has an (empty) head too; keeps forward() familiar
        self.init_weights()

    def set_activation_checkpointing(self, scope: str) -> None:
        """Recompute in backward what `scope` names (none | block | attn | mlp) in every block: the
        memory lever that lets ViT-g train at a real batch on one GPU (Block says what each costs)."""
        if scope not in CHECKPOINT_SCOPES:
            raise ValueError(f"activation checkpointing scope must be one of {CHECKPOINT_SCOPES}, got {scope!r}")
        for blk in self.blocks:
            blk.checkpoint_scope = scope

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---- tokens -------------------------------------------------------------------------------
    def interpolate_pos_encoding(self, h: int, w: int, dtype: torch.dtype) -> Tensor:
        """Position embedding for an (h x w)-patch grid: the learned square grid resized bicubically."""
        return grid_pos_embed(self.pos_embed, h, w, self.interpolate_offset, self.interpolate_antialias).to(dtype)

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """[B, C, H, W] -> [B, 1 + R + N, D]; masked patches are replaced by the learned mask token."""
        B, H, W = x.shape[0], int(x.shape[-2]), int(x.shape[-1])  # ints, also under jit tracing (fvcore)
        x = self.patch_embed(x)  # [B, N, D]
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)
        x = x + self.interpolate_pos_encoding(H // self.patch_size, W // self.patch_size, x.dtype)
        if self.register_tokens is not None:
            reg = self.register_tokens.expand(B, -1, -1).to(x.dtype)
            x = torch.cat([x[:, :1], reg, x[:, 1:]], dim=1)
        return x

    def _outputs(self, x: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        r = self.num_register_tokens
        x_norm = self.norm(x)
        return {
            "x_norm_clstoken": x_norm[:, 0],  # [B, D]
            "x_norm_regtokens": x_norm[:, 1 : r + 1],  # [B, R, D]
            "x_norm_patchtokens": x_norm[:, r + 1 :],  # [B, N, D]
            "x_prenorm": x,
            "masks": masks,
        }

    # ---- forward ------------------------------------------------------------------------------
    def forward_features(
        self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> dict | list[dict]:
        """One call for one tensor or for a list of crop batches of different sizes.

        Crops of the same size should come stacked in one tensor (the collate does this), so a
        2-global + 8-local recipe is two sequences per block, never padded to a common length.
        """
        if isinstance(x, Tensor):
            return self.forward_features([x], [masks])[0]
        masks_list = list(masks) if masks is not None else [None] * len(x)
        tokens = [self.prepare_tokens(xi, mi) for xi, mi in zip(x, masks_list, strict=True)]
        for blk in self.blocks:
            tokens = [blk(t) for t in tokens]
        return [self._outputs(t, m) for t, m in zip(tokens, masks_list, strict=True)]

    def forward(self, x: Tensor) -> Tensor:
        """Normalised CLS token [B, D] (what kNN and linear evaluation read)."""
        return self.head(self.forward_features(x)["x_norm_clstoken"])

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last `n` blocks (or of the block indices in `n`), as the official API."""
        wanted = set(range(self.n_blocks - n, self.n_blocks)) if isinstance(n, int) else set(n)
        bad = [i for i in wanted if not 0 <= i < self.n_blocks]
        if bad:
            raise ValueError(f"block indices {bad} out of range for a {self.n_blocks}-block model")
        t = self.prepare_tokens(x)
        outs = []
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            if i in wanted:
                outs.append(t)
        if norm:
            outs = [self.norm(o) for o in outs]
        r = self.num_register_tokens
        cls = [o[:, 0] for o in outs]
        patches = [o[:, 1 + r :] for o in outs]
        if reshape:
            B, _, H, W = x.shape
            p = self.patch_size
            patches = [o.reshape(B, H // p, W // p, -1).permute(0, 3, 1, 2).contiguous() for o in patches]
        if return_class_token:
            return tuple(zip(patches, cls, strict=True))
        return tuple(patches)


def vit_from_preset(arch: str, **kwargs) -> VisionTransformer:
    """Build a preset; keyword arguments (patch_size, img_size, overrides of the preset) pass through."""
    if arch not in PRESETS:
        raise ValueError(f"unknown arch {arch!r}; presets: {', '.join(PRESETS)}")
    dim, depth, heads, ffn = PRESETS[arch]
    defaults = {"embed_dim": dim, "depth": depth, "num_heads": heads, "ffn_layer": ffn}
    defaults.update({k: v for k, v in kwargs.items() if v is not None})
    return VisionTransformer(**defaults)
