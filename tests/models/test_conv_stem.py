"""models/conv_stem.py: a timm ViT whose patchify layer is a stack of 3x3 stride-2
convolutions still has timm's token grid, and DCAL runs on it unchanged."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from models.conv_stem import ConvStemPatchEmbed
from models.dcal import DCAL


def vit(img_size: int = 32, patch_size: int = 8):
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=img_size, patch_size=patch_size,
                             depth=2, embed_layer=ConvStemPatchEmbed)


def test_the_stem_replaces_the_patchify_conv_and_keeps_the_grid():
    model = vit()
    convs = [m for m in model.patch_embed.proj if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (2, 2), (1, 1)]  # log2(8) stride-2 convs, then 1x1
    assert [c.out_channels for c in convs] == [24, 48, 96, 192]
    assert model.patch_embed.grid_size == (4, 4)
    tokens = model.forward_features(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 1 + 16, 192)
    # Local filters: a pixel change in one corner leaves the opposite corner's token alone.
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[..., :4, :4] += 1.0
    a, b = model.patch_embed(x), model.patch_embed(y)
    # the far token sees the same pixels through the same kernels: bit-equal; the near one moves
    # by O(1) (a +1 pixel change), far beyond rounding
    assert not torch.allclose(a[0, 0], b[0, 0]) and torch.equal(a[0, -1], b[0, -1])


def test_a_patch_size_that_is_not_a_power_of_two_is_refused():
    with pytest.raises(ValueError, match="power-of-two"):
        vit(img_size=36, patch_size=6)


def test_dcal_trains_on_the_hybrid_vit():
    model = DCAL(num_classes=3, backbone_module=vit(), top_r=0.3)
    batch = {"image": torch.randn(6, 3, 32, 32), "identity": torch.tensor([0, 0, 1, 1, 2, 2])}
    out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["embedding"].shape == (6, 2 * 192)
    assert model.vit.patch_embed.proj[0].weight.grad is not None
    assert model.attention_rollout(batch["image"]).shape == (6, 4, 4)
