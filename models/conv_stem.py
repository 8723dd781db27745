"""A convolutional stem for timm Vision Transformers (a hybrid ViT).

Xiao et al., "Early Convolutions Help Transformers See Better" (NeurIPS 2021):
replacing the ViT's patchify layer (one ``patch x patch`` convolution with
stride ``patch``) by a few 3x3 stride-2 convolutions keeps every block of the
transformer (so DCAL's attention re-implementation still applies) while the
tokens start from local, translation-equivariant filters, which a few
thousand face images cannot teach a patchify layer.

Use: ``timm.create_model(vit_name, embed_layer=ConvStemPatchEmbed, patch_size=8, ...)``.
``patch_size`` must be a power of two: ``log2(patch_size)`` convolutions 3x3
stride 2 (BatchNorm, ReLU), widths doubling up to ``embed_dim / 2``, then a
1x1 convolution to ``embed_dim``. Everything else (grid size, flattening,
output format, image size checks) is timm's ``PatchEmbed``.
"""
from __future__ import annotations

import math
from typing import Any

from timm.layers import PatchEmbed
from torch import nn

__all__ = ["ConvStemPatchEmbed"]


class ConvStemPatchEmbed(PatchEmbed):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        ph, pw = self.patch_size
        if ph != pw or ph < 2 or ph & (ph - 1):
            raise ValueError(f"ConvStemPatchEmbed needs a square power-of-two patch size, got {self.patch_size}")
        in_chans, embed_dim = self.proj.in_channels, self.proj.out_channels
        device, dtype = self.proj.weight.device, self.proj.weight.dtype
        n = int(math.log2(ph))
        layers: list[nn.Module] = []
        width_in = in_chans
        for i in range(n):
            width = max(16, embed_dim >> (n - i))  # e.g. embed_dim 192, patch 8: 24, 48, 96
            layers += [nn.Conv2d(width_in, width, 3, stride=2, padding=1, bias=False, device=device, dtype=dtype),
                       nn.BatchNorm2d(width, device=device, dtype=dtype), nn.ReLU(inplace=True)]
            width_in = width
        layers.append(nn.Conv2d(width_in, embed_dim, 1, device=device, dtype=dtype))
        self.proj = nn.Sequential(*layers)
