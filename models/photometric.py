"""Networks of the photometric-stereo face recipes (pure ``torch.nn``).

- :class:`IRSE`: the face-recognition ResNet with squeeze-excitation (IR-SE-50 of
  ArcFace/insightface: BN-conv-PReLU-conv-BN-SE bottlenecks, 112x112 -> 512-d).
  Written here because timm has no IR-SE; ``blocks``/``widths`` make a tiny one
  for tests. The output layer flattens the last ``S/16 x S/16`` map, so the
  embedding keeps where things are on the face (what IR nets rely on).
- :class:`CbamResNet`: a basic-block ResNet whose blocks re-weight channels (avg
  + max pooled MLP) and then positions (7x7 conv over channel avg/max), CBAM
  (Woo et al. 2018); the original system's attention backbone.
- :class:`TimmFeatures`: a timm model (``convnextv2_*``) as a pooled-feature
  extractor (weights through :func:`models.backbones.build_backbone`: never a
  silent fallback to random weights).
- :class:`FeatureSeparation`: splits a pooled feature into an identity part and
  a non-identity (attribute) part.
- :class:`PhotometricEncoder`: one of the backbones, optionally followed by the
  separation module -> ``(identity embedding, attribute feature)``.
- :class:`GradientReversal` and :func:`grl_lambda` (DANN, Ganin & Lempitsky 2015):
  identity gradient reversed and scaled by ``2/(1+exp(-gamma p)) - 1``.
- :class:`ArrayAugment`: Gaussian noise and random resized crop of a rectangle
  for ``[C, H, W]`` tensors of any channel count (albedo, normals, depth); the
  torchvision/PIL transforms assume images of 1 or 3 channels in [0, 1];
  :func:`seeded_noise` is its noise after an 8-bit hand-off (on the device).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IRSE", "CbamResNet", "TimmFeatures", "FeatureSeparation", "PhotometricEncoder",
           "GradientReversal", "grad_reverse", "grl_lambda", "ArrayAugment", "seeded_noise", "quantise_map",
           "dequantise_map", "BACKBONES"]

BACKBONES = ("ir_se", "cbam_resnet", "convnextv2")


# ----------------------------------------------------------------------------- IR-SE

class SEModule(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(True),
                                nn.Conv2d(hidden, channels, 1, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x)


class BottleneckIRSE(nn.Module):
    """insightface's ``bottleneck_IR_SE``: the stride sits on the second conv."""

    def __init__(self, in_c: int, out_c: int, stride: int):
        super().__init__()
        if in_c == out_c:
            self.shortcut: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_c, out_c, 1, stride, bias=False), nn.BatchNorm2d(out_c))
        self.res = nn.Sequential(nn.BatchNorm2d(in_c), nn.Conv2d(in_c, out_c, 3, 1, 1, bias=False), nn.PReLU(out_c),
                                 nn.Conv2d(out_c, out_c, 3, stride, 1, bias=False), nn.BatchNorm2d(out_c),
                                 SEModule(out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res(x) + self.shortcut(x)


class IRSE(nn.Module):
    """IR-SE network: ``[B, in_chans, S, S] -> [B, embedding_dim]`` (S divisible by 16).

    ``blocks=(3, 4, 14, 3)``, ``widths=(64, 128, 256, 512)`` is IR-SE-50."""

    def __init__(self, in_chans: int = 3, img_size: int = 112, embedding_dim: int = 512,
                 blocks: Sequence[int] = (3, 4, 14, 3), widths: Sequence[int] = (64, 128, 256, 512),
                 dropout: float = 0.0):
        super().__init__()
        if img_size % 16 or len(blocks) != 4 or len(widths) != 4:
            raise ValueError(f"IR-SE needs img_size divisible by 16 and four stages (got {img_size}, "
                             f"{len(blocks)} blocks, {len(widths)} widths)")
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.PReLU(widths[0]))
        layers: list[nn.Module] = []
        in_c = widths[0]
        for n, out_c in zip(blocks, widths):
            for i in range(n):
                layers.append(BottleneckIRSE(in_c, out_c, 2 if i == 0 else 1))
                in_c = out_c
        self.body = nn.Sequential(*layers)
        side = img_size // 16
        self.output = nn.Sequential(nn.BatchNorm2d(in_c), nn.Dropout(dropout), nn.Flatten(),
                                    nn.Linear(in_c * side * side, embedding_dim), nn.BatchNorm1d(embedding_dim))
        self.num_features = embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.body(self.stem(x)))


# ----------------------------------------------------------------------------- CBAM ResNet

class ChannelAttention(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(True),
                                 nn.Conv2d(hidden, channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1)))


class SpatialAttention(nn.Module):
    def __init__(self, kernel: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.conv(pooled))


class CbamBlock(nn.Module):
    def __init__(self, in_c: int, out_c: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_c, out_c, 3, stride, 1, bias=False), nn.BatchNorm2d(out_c),
                                  nn.ReLU(True), nn.Conv2d(out_c, out_c, 3, 1, 1, bias=False), nn.BatchNorm2d(out_c),
                                  ChannelAttention(out_c), SpatialAttention())
        self.shortcut = nn.Identity() if stride == 1 and in_c == out_c else nn.Sequential(
            nn.Conv2d(in_c, out_c, 1, stride, bias=False), nn.BatchNorm2d(out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class CbamResNet(nn.Module):
    """``[B, in_chans, S, S] -> [B, embedding_dim]``: stem, four stages of CBAM basic
    blocks (widths ``w, 2w, 4w, 8w``, the first three stages halve the resolution
    after the stem's), global average pooling, linear + BatchNorm1d."""

    def __init__(self, in_chans: int = 3, embedding_dim: int = 512, width: int = 64,
                 blocks: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(True))
        layers: list[nn.Module] = []
        in_c = width
        for s, n in enumerate(blocks):
            out_c = width * 2 ** s
            for i in range(n):
                layers.append(CbamBlock(in_c, out_c, 2 if i == 0 and s > 0 else 1))
                in_c = out_c
        self.body = nn.Sequential(*layers)
        self.neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_c, embedding_dim),
                                  nn.BatchNorm1d(embedding_dim))
        self.num_features = embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.body(self.stem(x)))


# ----------------------------------------------------------------------------- timm + separation

class TimmFeatures(nn.Module):
    """A built timm model without classifier (pooled features, ``num_features`` wide)."""

    def __init__(self, model: nn.Module, num_features: int):
        super().__init__()
        self.model, self.num_features = model, num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class FeatureSeparation(nn.Module):
    """Splits a pooled feature into an identity part (what the identity head and the
    verification embedding see) and a non-identity part (what the attribute heads
    see). Two linear projections with their own normalisation; what keeps them
    apart is training: the attribute losses pull attributes into the non-identity
    part and the adversarial heads behind :class:`GradientReversal` push them out of
    the identity part."""

    def __init__(self, in_dim: int, id_dim: int, nonid_dim: int, dropout: float = 0.0):
        super().__init__()
        self.identity = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, id_dim), nn.BatchNorm1d(id_dim))
        self.non_identity = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, nonid_dim), nn.ReLU(True),
                                          nn.BatchNorm1d(nonid_dim))

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.identity(feat), self.non_identity(feat)


class PhotometricEncoder(nn.Module):
    """Backbone (+ separation) -> ``(identity embedding [B, embedding_dim], attribute
    feature [B, attr_dim])``. Without separation both are the backbone's embedding."""

    def __init__(self, backbone: nn.Module, embedding_dim: int, separation: bool, nonid_dim: int = 256,
                 dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        feat = int(backbone.num_features)
        if separation:
            self.fsm: nn.Module | None = FeatureSeparation(feat, embedding_dim, nonid_dim, dropout)
            self.attr_dim = nonid_dim
        else:
            if feat != embedding_dim:
                raise ValueError(f"without feature separation the backbone must give embedding_dim={embedding_dim} "
                                 f"features, it gives {feat}")
            self.fsm = None
            self.attr_dim = embedding_dim
        self.embedding_dim = embedding_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.backbone(x)
        if self.fsm is None:
            return feat, feat
        return self.fsm(feat)


# ----------------------------------------------------------------------------- gradient reversal

class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(lam)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (lam,) = ctx.saved_tensors
        return -lam.to(grad.dtype) * grad, None


def grad_reverse(x: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """Identity forward; the gradient is multiplied by ``-lam`` backward. ``lam`` may be a
    tensor (a schedule computed on the device: no host sync, no recompile per value)."""
    return _GradReverse.apply(x, torch.as_tensor(lam, dtype=torch.float32, device=x.device))


def grl_lambda(progress: float | torch.Tensor, gamma: float = 10.0) -> float | torch.Tensor:
    """DANN's schedule ``2 / (1 + exp(-gamma p)) - 1``: 0 at p=0, -> 1 as p -> 1
    (a float for a float, a tensor for a tensor)."""
    if isinstance(progress, torch.Tensor):
        return 2.0 / (1.0 + torch.exp(-gamma * progress.float().clamp(0.0, 1.0))) - 1.0
    p = min(max(float(progress), 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


class GradientReversal(nn.Module):
    """Gradient reversal whose strength follows :func:`grl_lambda` over training:
    ``progress = training forward passes / total_steps`` (counted in a persistent
    buffer, so a resumed run continues the schedule), times ``max_lambda``."""

    def __init__(self, total_steps: int, gamma: float = 10.0, max_lambda: float = 1.0):
        super().__init__()
        self.total_steps, self.gamma, self.max_lambda = max(1, int(total_steps)), float(gamma), float(max_lambda)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def current_lambda(self) -> float:
        return self.max_lambda * grl_lambda(int(self.steps) / self.total_steps, self.gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The schedule in tensor ops on the step buffer: compiled, one graph serves every step
        # (a Python float read from the buffer breaks the graph and recompiles per value).
        # The count is replaced, never incremented in place: a compiled backward reads the
        # forward's inputs after the forward has run, so an in-place += would hand it the next
        # step's lambda (torch 2.14, aot_autograd; tests/models/test_photometric.py).
        lam = self.max_lambda * grl_lambda(self.steps / self.total_steps, self.gamma)
        if self.training:
            self.steps = self.steps + 1
        return grad_reverse(x, lam)


# ----------------------------------------------------------------------------- augmentation

class ArrayAugment:
    """Augmentations of a ``[C, H, W]`` float tensor with any number of channels.

    - random resized crop of a rectangle: area fraction in ``scale``, aspect ratio
      (w/h) in ``ratio`` (log-uniform), resized back to ``H x W`` (bilinear);
    - additive Gaussian noise with standard deviation ``noise_std`` times the
      tensor's own per-channel std (so depth in millimetres and normals in [-1, 1]
      get comparable corruption).
    Draws come from torch's global RNG, which the shard stream seeds per sample."""

    def __init__(self, p_crop: float = 0.5, scale: tuple[float, float] = (0.8, 1.0),
                 ratio: tuple[float, float] = (0.85, 1.15), p_noise: float = 0.3, noise_std: float = 0.05):
        for name, p in (("p_crop", p_crop), ("p_noise", p_noise)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if not 0.0 < scale[0] <= scale[1] <= 1.0 or not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"bad crop scale {scale} / ratio {ratio}")
        self.p_crop, self.scale, self.ratio = p_crop, scale, ratio
        self.p_noise, self.noise_std = p_noise, noise_std

    @staticmethod
    def _uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(()))

    def crop_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of a random rectangle (torchvision's draw)."""
        area = h * w
        for _ in range(10):
            a = area * self._uniform(*self.scale)
            r = math.exp(self._uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, ()))
                left = int(torch.randint(0, w - cw + 1, ()))
                return top, left, ch, cw
        return 0, 0, h, w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = self.crop(x)
        if self.draws_noise():
            std = x.flatten(1).std(1).clamp(min=1e-6)[:, None, None]
            x = x + torch.randn_like(x) * self.noise_std * std
        return x

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """The crop part alone (bilinear: a convex mix of the pixels, so 8-bit data stay in 0..255)."""
        if x.ndim != 3:
            raise ValueError(f"ArrayAugment expects [C, H, W], got {tuple(x.shape)}")
        _, h, w = x.shape
        if self.p_crop > 0 and float(torch.rand(())) < self.p_crop:
            top, left, ch, cw = self.crop_box(h, w)
            if (ch, cw) != (h, w):
                x = F.interpolate(x[None, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear",
                                  align_corners=False)[0]
        return x

    def draws_noise(self) -> bool:
        """Whether this sample gets noise (one draw of the global RNG)."""
        return self.p_noise > 0 and self.noise_std > 0 and float(torch.rand(())) < self.p_noise

    def noise_seed(self) -> int:
        """For data handed over as 8 bits, whose noise is added after the hand-off
        (:func:`seeded_noise`): the sample's noise seed, or -1 for none (global RNG draws)."""
        return int(torch.randint(0, 2 ** 62, ())) if self.draws_noise() else -1


def quantise_map(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float map ``[C, H, W]`` as 8 bits per value for the hand-off out of the DataLoader
    workers: ``(uint8 [C, H, W], [C, 2] float32 (low, high) per channel)``; the levels span
    each channel's own range, so :func:`dequantise_map` gives every value back within
    ``(high - low) / 510`` (half a level; plus float32 rounding)."""
    flat = x.float().flatten(1)
    low, high = flat.amin(1), flat.amax(1)
    step = ((high - low) / 255).clamp(min=torch.finfo(torch.float32).tiny)
    levels = ((x.float() - low[:, None, None]) / step[:, None, None]).round_().clamp_(0, 255)
    return levels.to(torch.uint8), torch.stack([low, high], 1)


def dequantise_map(levels: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` uint8 levels and ``[B, C, 2]`` ranges (:func:`quantise_map`) -> float32."""
    low, high = ranges[..., 0].float(), ranges[..., 1].float()
    step = ((high - low) / 255).clamp(min=torch.finfo(torch.float32).tiny)
    return levels.float() * step[..., None, None] + low[..., None, None]


def seeded_noise(x: torch.Tensor, seeds: torch.Tensor, noise_std: float) -> torch.Tensor:
    """:class:`ArrayAugment`'s noise on a batch ``[B, C, H, W]`` after the 8-bit hand-off: row
    ``i`` gets Gaussian noise of ``noise_std`` times its own per-channel std, drawn on ``x``'s
    device by a generator seeded with ``seeds[i]`` (no global RNG; the same numbers for the
    same seed on the same kind of device, so a resumed run adds the same noise); ``-1``: none."""
    rows = [i for i, s in enumerate(seeds.tolist()) if s >= 0]
    if not rows:
        return x
    x = x.clone()
    for i in rows:
        std = x[i].flatten(1).std(1).clamp(min=1e-6)[:, None, None]
        g = torch.Generator(device=x.device).manual_seed(int(seeds[i]))
        noise = torch.randn(x[i].shape, generator=g, device=x.device, dtype=torch.float32).to(x.dtype)
        x[i] = x[i] + noise * noise_std * std
    return x
