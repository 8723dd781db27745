"""Attention blocks on a CNN's feature map: DCAL on ResNet / EfficientNet / ConvNeXt.

The original DCAL twin-verification configs name a CNN (``backbone: resnet50``)
with ``attention_dim`` and ``num_heads``: transformer blocks on top of the
CNN's last feature map. This module builds that network *as a timm
VisionTransformer*, so every piece of :mod:`models.dcal` (the re-implemented
SA block forward, GLCA, PWCA, attention rollout) applies unchanged:

* the CNN's ``forward_features`` (last stage, ``[B, C, H', W']``, stride 32 for
  ResNet; ``backbone_kwargs: {output_stride: 16}`` gives a finer grid) is timm's
  :class:`~timm.layers.HybridEmbed` "patch embedding": a 1x1 convolution to
  ``attention_dim``, flattened to ``H' x W'`` tokens;
* a CLS token and learned positional embeddings (timm's, one per grid cell + CLS);
* ``depth`` timm ``Block`` s with ``num_heads`` heads of width ``attention_dim``;
* the final norm. DCAL's rollout is then over the ``H' x W'`` CNN grid.

The CNN's weights (timm hub or a local file, :func:`models.backbones.build_backbone`)
are put back after the ViT's own initialisation, which would otherwise re-run
the CNN's ``init_weights`` (timm's ViT init calls it on every submodule).
"""
from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from models.backbones import build_backbone

__all__ = ["CNN_MODULES", "CNNFeatureMap", "build_cnn_attention_vit", "check_attention_shape"]

# timm modules whose models end in a plain NCHW feature map (forward_features).
CNN_MODULES = ("timm.models.resnet", "timm.models.efficientnet", "timm.models.convnext", "timm.models.regnet",
               "timm.models.mobilenetv3", "timm.models.resnest", "timm.models.densenet")


def check_attention_shape(attention_dim: int, num_heads: int) -> None:
    """``ValueError`` (one line naming the keys) unless ``attention_dim`` splits into ``num_heads`` heads."""
    if attention_dim < 1 or num_heads < 1:
        raise ValueError(f"attention_dim ({attention_dim}) and num_heads ({num_heads}) must be >= 1 "
                         "for a CNN backbone")
    if attention_dim % num_heads:
        raise ValueError(f"attention_dim ({attention_dim}) must be a multiple of num_heads ({num_heads}): "
                         "each head gets attention_dim / num_heads channels")


class CNNFeatureMap(nn.Module):
    """The CNN's last feature map (``forward_features``), what ``HybridEmbed`` projects to tokens."""

    def __init__(self, cnn: nn.Module):
        super().__init__()
        self.cnn = cnn

    def forward(self, x: Any) -> Any:
        return self.cnn.forward_features(x)


def build_cnn_attention_vit(cnn_name: str, *, attention_dim: int, num_heads: int, depth: int, img_size: int,
                            weights: bool | str = False, cnn_kwargs: dict[str, Any] | None = None,
                            **vit_kwargs: Any) -> nn.Module:
    """A timm ``VisionTransformer`` whose tokens are ``cnn_name``'s feature map (see the module docstring).
    ``vit_kwargs`` go to the ViT (``drop_path_rate``, ``mlp_ratio``, ...)."""
    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import VisionTransformer

    check_attention_shape(attention_dim, num_heads)
    if depth < 1:
        raise ValueError(f"depth must be >= 1 attention blocks on the CNN, got {depth}")
    cnn, _ = build_backbone(cnn_name, weights, img_size=None, **(cnn_kwargs or {}))
    trained = {k: v.clone() for k, v in cnn.state_dict().items()} if weights else None
    trunk = CNNFeatureMap(cnn)
    vit = VisionTransformer(img_size=img_size, patch_size=1, embed_dim=attention_dim, depth=depth,
                            num_heads=num_heads, num_classes=0, global_pool="token",
                            embed_layer=partial(HybridEmbed, backbone=trunk), **vit_kwargs)
    if trained is not None:
        cnn.load_state_dict(trained)
    return vit
