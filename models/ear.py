"""The ear teacher network: ConvNeXt encoder, projection, SimSiam predictor,
reconstruction decoder, and an optional margin head on pseudo-labels.

``EarTeacherNet(images)`` -> ``features`` (pooled backbone, e.g. 768-d for
``convnext_tiny``), ``projection`` (the embedding, ``projection_dim``),
``prediction`` (SimSiam predictor of the projection) and ``reconstruction``
(the decoder's image, the input's size and normalisation).

- Encoder: a timm ConvNeXt (``build_backbone``; ``pretrained`` = a local
  weights file, never a silent random start); ``dims``/``depths`` override
  the widths and depths (narrow networks for tests and CPU benchmarks).
- Projection: SimSiam's MLP (Linear-BN-ReLU-Linear-BN).
- Predictor: SimSiam's bottleneck MLP (Linear-BN-ReLU-Linear).
- Decoder: from the last feature map, transposed convolutions (stride 2) +
  batch norm + ReLU, one per factor 2 back to the input size, then a 3x3
  convolution to the image channels (bilinear resize at the end when the
  input size is not the feature size times a power of two).

:func:`simsiam_loss` is the symmetric negative cosine with stop-gradient on
the targets (Chen & He 2021).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import WeightsError, build_backbone

__all__ = ["EarTeacherNet", "ReconstructionDecoder", "simsiam_loss", "WeightsError"]


def _mlp(sizes: Sequence[int], last_bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        layers.append(nn.Linear(a, b, bias=last and not last_bn))
        if not last:
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)


class ReconstructionDecoder(nn.Module):
    """``[B, C, h, w]`` feature map -> ``[B, out_chans, size, size]``."""

    def __init__(self, in_chans: int, feature_size: int, size: int, width: int = 256, min_width: int = 16,
                 out_chans: int = 3):
        super().__init__()
        self.size = size
        stages = max(0, round(math.log2(max(size, 1) / max(feature_size, 1))))
        layers: list[nn.Module] = []
        c = in_chans
        w = width
        for _ in range(stages):
            layers += [nn.ConvTranspose2d(c, w, kernel_size=4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c, w = w, max(min_width, w // 2)
        layers.append(nn.Conv2d(c, out_chans, kernel_size=3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        out = self.net(fmap)
        if out.shape[-1] != self.size or out.shape[-2] != self.size:
            out = F.interpolate(out, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return out


class EarTeacherNet(nn.Module):
    def __init__(self, backbone: str = "convnext_tiny", pretrained: str = "", img_size: int = 224,
                 projection_dim: int = 256, projection_hidden: int = 1024, predictor_hidden: int = 64,
                 decoder_width: int = 256, dims: Sequence[int] = (), depths: Sequence[int] = ()):
        super().__init__()
        if pretrained and not os.path.isfile(pretrained):
            raise WeightsError(f"pretrained weights file not found: {pretrained} (give an existing local file, "
                               "or leave it empty for a random start)")
        kw = {}
        if dims:
            kw["dims"] = tuple(int(d) for d in dims)
        if depths:
            kw["depths"] = tuple(int(d) for d in depths)
        self.encoder, self.feature_dim = build_backbone(backbone, pretrained or False, **kw)
        with torch.no_grad():
            probe = self.encoder.forward_features(torch.zeros(1, 3, img_size, img_size))
        self.feature_chans, feature_size = int(probe.shape[1]), int(probe.shape[-1])
        self.projector = _mlp([self.feature_dim, projection_hidden, projection_dim], last_bn=True)
        self.predictor = _mlp([projection_dim, predictor_hidden, projection_dim], last_bn=False)
        self.decoder = ReconstructionDecoder(self.feature_chans, feature_size, img_size, decoder_width)
        self.projection_dim = projection_dim

    def forward(self, images: torch.Tensor, reconstruct: bool = True) -> dict[str, torch.Tensor]:
        fmap = self.encoder.forward_features(images)
        features = self.encoder.forward_head(fmap, pre_logits=True)
        z = self.projector(features)
        out = {"features": features, "projection": z, "prediction": self.predictor(z)}
        if reconstruct:
            out["reconstruction"] = self.decoder(fmap)
        return out

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The projection (what the pseudo-label head and SimSiam train)."""
        fmap = self.encoder.forward_features(images)
        return self.projector(self.encoder.forward_head(fmap, pre_logits=True))


def simsiam_loss(p1: torch.Tensor, z2: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """``-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2``, in [-1, 1]."""
    def d(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()

    return 0.5 * (d(p1, z2) + d(p2, z1))
