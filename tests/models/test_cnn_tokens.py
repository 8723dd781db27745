"""models/cnn_tokens.py: DCAL on a CNN backbone (attention blocks on its feature map),
as the original DCAL's ``backbone: resnet50`` with ``attention_dim`` / ``num_heads``."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from models.cnn_tokens import CNNFeatureMap, build_cnn_attention_vit, check_attention_shape
from models.dcal import DCAL, check_backbone_name, rollout

# a quarter-width ResNet-18; output_stride 8 gives a 4x4 grid at 32 px
TINY = {"channels": [8, 16, 16, 32], "stem_width": 8, "output_stride": 8}


def dcal_cnn(**kw):
    args = dict(num_classes=3, backbone="resnet18", img_size=32, backbone_kwargs=TINY, attention_dim=32,
                num_heads=4, attention_depth=2, top_r=0.3)
    args.update(kw)
    return DCAL(**args)


def test_cnn_names_are_told_apart_from_vits_and_others():
    assert check_backbone_name("resnet50") == "cnn" and check_backbone_name("efficientnet_b0") == "cnn"
    assert check_backbone_name("vit_tiny_patch16_224") == "vit"
    with pytest.raises(ValueError, match="apply to a CNN backbone"):
        DCAL(num_classes=3, backbone="vit_tiny_patch16_224", img_size=32, attention_dim=64, num_heads=4)
    with pytest.raises(ValueError, match="swin") as err:
        check_backbone_name("swin_tiny_patch4_window7_224")
    assert "\n" not in str(err.value) and "attention_dim" in str(err.value)


def test_feature_map_tokens_cls_and_positions():
    torch.manual_seed(0)
    model = dcal_cnn()
    vit = model.vit
    assert isinstance(vit.patch_embed.backbone, CNNFeatureMap)
    x = torch.randn(2, 3, 32, 32)
    fmap = vit.patch_embed.backbone(x)
    assert fmap.shape == (2, 32, 4, 4)                        # the CNN's own last feature map
    assert vit.patch_embed.grid_size == (4, 4) and vit.patch_embed.proj.kernel_size == (1, 1)
    assert vit.pos_embed.shape == (1, 1 + 16, 32) and vit.cls_token.shape == (1, 1, 32)
    assert [b.attn.num_heads for b in vit.blocks] == [4, 4] and vit.embed_dim == 32
    # the tokens are the 1x1 projection of each grid cell, in row-major order
    tokens = vit.patch_embed(x)
    expected = vit.patch_embed.proj(fmap).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)


def test_dcal_trains_on_the_cnn_and_the_rollout_covers_its_grid():
    torch.manual_seed(0)
    model = dcal_cnn()
    batch = {"image": torch.randn(6, 3, 32, 32), "identity": torch.tensor([0, 0, 1, 1, 2, 2])}
    out = model(batch)
    out["loss"].backward()
    assert set(out["terms"]) == {"sa", "glca", "pwca", "metric"} and torch.isfinite(out["loss"])
    assert out["embedding"].shape == (6, 2 * 32)
    cnn = model.vit.patch_embed.backbone.cnn
    assert cnn.conv1.weight.grad is not None and cnn.conv1.weight.grad.abs().sum() > 0   # the CNN is trained
    assert model.vit.patch_embed.proj.weight.grad.abs().sum() > 0
    model.eval()
    maps = model.attention_rollout(batch["image"])
    assert maps.shape == (6, 4, 4)                            # one weight per CNN grid cell
    sa = model.forward_sa(batch["image"], need_weights=True)
    assert len(sa["attn"]) == 2                               # over both attention blocks
    r = rollout(sa["attn"])
    torch.testing.assert_close(maps, r[:, 0, 1:].reshape(6, 4, 4))
    # GLCA keeps round(0.3 * 16) = 5 grid cells (never the CLS token)
    idx = model.branches(batch["image"])["glca_index"]
    assert idx.shape == (6, 5) and int(idx.min()) >= 1


def test_local_cnn_weights_survive_the_vit_initialisation(tmp_path):
    """timm's ViT init re-runs the ResNet's own init_weights: the file's weights are put back after."""
    torch.manual_seed(1)
    cnn = timm.create_model("resnet18", num_classes=0, **TINY)
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    model = dcal_cnn(weights_path=str(tmp_path / "r18.safetensors"))
    loaded = model.vit.patch_embed.backbone.cnn.state_dict()
    for k, v in cnn.state_dict().items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize("dim, heads, fragment", [(30, 4, "multiple of num_heads"), (0, 4, ">= 1"),
                                                  (32, 0, ">= 1")])
def test_a_bad_attention_shape_is_one_line(dim, heads, fragment):
    with pytest.raises(ValueError, match=fragment) as err:
        check_attention_shape(dim, heads)
    assert "\n" not in str(err.value) and "attention_dim" in str(err.value)
    with pytest.raises(ValueError, match=fragment):
        build_cnn_attention_vit("resnet18", attention_dim=dim, num_heads=heads, depth=1, img_size=32,
                                cnn_kwargs=TINY)
