"""The ViT: presets, official keys, list forward, stochastic depth, position-embedding interpolation."""

import pytest
import torch

from dinolike.layers.block import residual_with_drop_path
from dinolike.models import (
    CheckpointMismatchError,
    DINOHead,
    build_backbone,
    infer_backbone_cfg,
    load_state_strict,
    vit_from_preset,
)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "arch,millions",
    [("vit_small", 22.06), ("vit_base", 86.58), ("vit_large", 304.37), ("vit_giant2", 1136.48)],
)
def test_presets_parameter_counts(arch: str, millions: float) -> None:
    # ViT-S/14 ~21-22 M and ViT-g ~1.1 B (DINOv2 paper, Table 1), with the 518 px position grid of the
    # released backbones; giant2 is built on the meta device (no memory).
    with torch.device("meta"):
        m = vit_from_preset(arch, patch_size=14, img_size=518)
    assert abs(n_params(m) / 1e6 - millions) < 0.01


def test_official_key_names() -> None:
    m = vit_from_preset("vit_small", patch_size=14, img_size=56, n_registers=4)
    keys = set(m.state_dict())
    for k in ["cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed.proj.weight",
              "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias",
              "blocks.0.ls1.gamma", "blocks.0.mlp.fc1.weight", "blocks.11.ls2.gamma", "norm.bias"]:
        assert k in keys, k
    with torch.device("meta"):
        g = vit_from_preset("vit_giant2", patch_size=14, img_size=56)
    assert "blocks.39.mlp.w12.weight" in g.state_dict() and "blocks.39.mlp.w3.weight" in g.state_dict()
    assert g.state_dict()["blocks.0.mlp.w12.weight"].shape == (2 * 4096, 1536)


def test_list_forward_equals_per_crop_forward() -> None:
    torch.manual_seed(0)
    m = vit_from_preset("vit_pico", patch_size=4, img_size=28, in_chans=1, n_registers=2).eval()
    g, loc = torch.randn(4, 1, 28, 28), torch.randn(6, 1, 12, 12)
    masks = torch.rand(4, 49) < 0.3
    both = m.forward_features([g, loc], masks=[masks, None])
    one_g = m.forward_features(g, masks=masks)
    one_l = m.forward_features(loc)
    for key in ["x_norm_clstoken", "x_norm_patchtokens", "x_norm_regtokens"]:
        torch.testing.assert_close(both[0][key], one_g[key])
        torch.testing.assert_close(both[1][key], one_l[key])
    # masking changes the output only through the masked tokens' inputs
    assert not torch.allclose(one_g["x_norm_clstoken"], m.forward_features(g)["x_norm_clstoken"])


def test_drop_path_identity_at_rate_zero_and_in_eval() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 5, 16)
    branch = torch.nn.Linear(16, 16)
    expected = x + branch(x)
    torch.testing.assert_close(residual_with_drop_path(x, branch, 0.0, training=True), expected)
    torch.testing.assert_close(residual_with_drop_path(x, branch, 0.5, training=False), expected)
    m = vit_from_preset("vit_pico", patch_size=4, img_size=28, in_chans=1, drop_path_rate=0.5)
    m.eval()
    inp = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(m(inp), m(inp))


def test_drop_path_skips_samples_and_keeps_expectation() -> None:
    torch.manual_seed(0)
    x = torch.zeros(1000, 1, 1)
    out = residual_with_drop_path(x, lambda t: torch.ones_like(t), 0.25, training=True)
    changed = (out != 0).flatten()
    assert changed.sum() == 750  # exactly the kept subset was computed
    assert out.sum().item() == pytest.approx(1000.0)  # scaled by B / kept: unbiased


def test_pos_embed_interpolation_any_size() -> None:
    m = vit_from_preset("vit_pico", patch_size=4, img_size=28, in_chans=1).eval()
    out = m.forward_features(torch.randn(2, 1, 56, 40))
    assert out["x_norm_patchtokens"].shape == (2, 14 * 10, 96)
    # at the native size the learned grid is used unchanged
    pe = m.interpolate_pos_encoding(7, 7, torch.float32)
    torch.testing.assert_close(pe, m.pos_embed)
    # bicubic resizing of a constant grid is constant
    with torch.no_grad():
        m.pos_embed.fill_(0.5)
    torch.testing.assert_close(m.interpolate_pos_encoding(11, 9, torch.float32),
                               torch.full((1, 100, 96), 0.5))


def test_get_intermediate_layers() -> None:
    m = vit_from_preset("vit_pico", patch_size=4, img_size=28, in_chans=1, n_registers=1).eval()
    x = torch.randn(2, 1, 28, 28)
    outs = m.get_intermediate_layers(x, n=2, return_class_token=True)
    assert len(outs) == 2 and outs[0][0].shape == (2, 49, 96) and outs[0][1].shape == (2, 96)
    last = m.forward_features(x)
    torch.testing.assert_close(outs[-1][0], last["x_norm_patchtokens"])
    torch.testing.assert_close(outs[-1][1], last["x_norm_clstoken"])
    grids = m.get_intermediate_layers(x, n=[0, 3], reshape=True)
    assert grids[0].shape == (2, 96, 7, 7)
    with pytest.raises(ValueError, match="out of range"):
        m.get_intermediate_layers(x, n=[4])


def test_strict_loading_names_the_offending_keys() -> None:
    m = vit_from_preset("vit_pico", patch_size=4, img_size=28, in_chans=1)
    sd = m.state_dict()
    del sd["blocks.2.attn.qkv.weight"]
    sd["blocks.0.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: blocks\.2\.attn\.qkv\.weight.*"
                                                      r"unexpected keys: blocks\.0\.extra"):
        load_state_strict(m, sd)
    sd = m.state_dict()
    sd["norm.weight"] = torch.zeros(5)
    with pytest.raises(CheckpointMismatchError, match=r"norm\.weight \(checkpoint \(5,\) vs model \(96,\)\)"):
        load_state_strict(m, sd)


def test_architecture_inferred_from_an_official_state_dict() -> None:
    m = vit_from_preset("vit_small", patch_size=14, img_size=56, n_registers=4)
    cfg = infer_backbone_cfg(m.state_dict())
    assert cfg["embed_dim"] == 384 and cfg["depth"] == 12 and cfg["num_heads"] == 6
    assert cfg["patch_size"] == 14 and cfg["n_registers"] == 4 and cfg["img_size"] == 56
    rebuilt = build_backbone({"arch": "custom", **cfg})
    load_state_strict(rebuilt, m.state_dict())


def test_dino_head_output_is_bounded_by_weight_norm() -> None:
    head = DINOHead(96, 300, hidden_dim=64, bottleneck_dim=32)
    logits = head(torch.randn(10, 96) * 100)
    # L2-normalised bottleneck times unit-norm prototypes (g = 1): cosine similarities
    assert logits.shape == (10, 300) and logits.abs().max() <= 1.0 + 1e-5
    assert {"last_layer.weight_g", "last_layer.weight_v", "mlp.0.weight", "mlp.4.weight"} <= set(head.state_dict())


def _loss_grads_saved(scope: str) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """(loss, parameter grads, bytes autograd kept for backward) of one training forward+backward."""
    torch.manual_seed(0)
    m = vit_from_preset("vit_pico", patch_size=4, img_size=28, in_chans=1, drop_path_rate=0.3).train()
    m.set_activation_checkpointing(scope)
    x = torch.randn(6, 1, 28, 28)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    torch.manual_seed(1)  # the same stochastic-depth draws in every run
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = m.forward_features([x, x[:, :, :16, :16]])
    loss = sum(o["x_norm_patchtokens"].square().mean() + o["x_norm_clstoken"].sum() for o in out)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None], saved


def test_activation_checkpointing_scopes_same_gradients_less_memory() -> None:
    """Each scope recomputes in backward (stochastic depth replayed) and so keeps fewer activations."""
    ref_loss, ref_grads, ref_saved = _loss_grads_saved("none")
    saved = {}
    for scope in ("block", "attn", "mlp"):
        loss, grads, saved[scope] = _loss_grads_saved(scope)
        torch.testing.assert_close(loss, ref_loss)
        assert len(grads) == len(ref_grads)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert saved["block"] < saved["mlp"] < ref_saved and saved["attn"] < ref_saved
    assert saved["block"] < 0.2 * ref_saved  # only what lies outside the blocks is kept
    with pytest.raises(ValueError, match="scope"):
        vit_from_preset("vit_pico").set_activation_checkpointing("ffn")
