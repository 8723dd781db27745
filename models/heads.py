"""Classification heads: additive-margin softmax heads (ArcFace, CosFace) and a
plain linear classifier, all with the same call ``head(emb, labels=None)``.

Margin heads compute ``cos(theta_j) = <emb/|emb|, W_j/|W_j|>`` in float32 (safe
under fp16/bf16 autocast) and return ``s * cos(theta_j)`` for every class. Only
while the module is in training mode *and* labels are given is the margin
applied, and only to the target logit:

- ArcFace (Deng et al. 2019): ``s * cos(theta_y + m)``; past ``theta_y > pi - m``
  (where ``cos(theta + m)`` is no longer monotonic) the insightface fallback
  ``s * (cos(theta_y) - m * sin(m))`` is used (``easy_margin=False``).
- CosFace (Wang et al. 2018): ``s * (cos(theta_y) - m)``.

In eval mode (or without labels) the logits are the margin-free ``s * cos``, so
validation losses are plain softmax losses on the scaled cosines and the
arg-max is the nearest class centre. Labels outside ``[0, num_classes)`` (e.g.
``-1`` for "unknown") get no margin.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ArcFace", "CosFace", "LinearHead", "MagLinear", "arcface_target", "build_identity_head", "cosface_target",
           "magface_target", "target_margin"]


def arcface_target(cos_y: torch.Tensor, m: float) -> torch.Tensor:
    """ArcFace's target cosine ``cos(theta_y + m)``, with insightface's fallback
    ``cos(theta_y) - m * sin(m)`` past ``theta_y > pi - m``."""
    sin_y = torch.sqrt((1.0 - cos_y * cos_y).clamp(min=1e-7))
    phi = cos_y * math.cos(m) - sin_y * math.sin(m)  # cos(theta + m)
    return torch.where(cos_y > math.cos(math.pi - m), phi, cos_y - math.sin(math.pi - m) * m)


def cosface_target(cos_y: torch.Tensor, m: float) -> torch.Tensor:
    """CosFace's target cosine ``cos(theta_y) - m``."""
    return cos_y - m


def magface_target(cos_y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """ArcFace's target cosine with a margin per row (MagFace's ``m(a)``, a tensor
    broadcasting against ``cos_y``), with the same fallback past ``theta_y > pi - m``."""
    sin_y = torch.sqrt((1.0 - cos_y * cos_y).clamp(min=1e-7))
    phi = cos_y * torch.cos(m) - sin_y * torch.sin(m)
    return torch.where(cos_y > torch.cos(math.pi - m), phi, cos_y - torch.sin(math.pi - m) * m)


def target_margin(kind: str) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """The target-cosine function of a margin head (``arcface | cosface``); the
    replicated heads here and the sharded one (:mod:`models.partial_fc`) share it."""
    try:
        return {"arcface": arcface_target, "cosface": cosface_target, "magface": magface_target}[kind]
    except KeyError:
        raise ValueError(f"unknown margin {kind!r} (arcface | cosface | magface)") from None


class _CosineHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int, s: float, m: float):
        super().__init__()
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.in_features, self.num_classes = in_features, num_classes
        self.s, self.m = float(s), float(m)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """``[B, num_classes]`` cosine similarities to the class centres (float32)."""
        return F.linear(F.normalize(emb.float(), dim=1), F.normalize(self.weight.float(), dim=1))

    def _target_margin(self, cos_y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(emb)
        if labels is None or not self.training or self.m == 0:
            return cos * self.s
        labels = labels.long()
        valid = (labels >= 0) & (labels < self.num_classes)
        idx = labels.clamp(0, self.num_classes - 1).unsqueeze(1)
        cos_y = cos.gather(1, idx)
        new_y = torch.where(valid.unsqueeze(1), self._target_margin(cos_y), cos_y)
        logits = cos.scatter(1, idx, new_y)
        return logits * self.s

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, s={self.s}, m={self.m}"


class ArcFace(_CosineHead):
    """Additive angular margin: target logit ``s*cos(theta_y + m)``."""

    def __init__(self, in_features: int, num_classes: int, s: float = 30.0, m: float = 0.5):
        super().__init__(in_features, num_classes, s, m)

    def _target_margin(self, cos_y: torch.Tensor) -> torch.Tensor:
        return arcface_target(cos_y, self.m)


class CosFace(_CosineHead):
    """Additive cosine margin: target logit ``s*(cos(theta_y) - m)``."""

    def __init__(self, in_features: int, num_classes: int, s: float = 30.0, m: float = 0.35):
        super().__init__(in_features, num_classes, s, m)

    def _target_margin(self, cos_y: torch.Tensor) -> torch.Tensor:
        return cosface_target(cos_y, self.m)


class LinearHead(nn.Module):
    """Dropout + linear classifier; ``labels`` is accepted and ignored."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes, bias=bias)
        self.num_classes = num_classes

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(self.drop(emb))


def build_identity_head(kind: str, in_features: int, num_classes: int, s: float = 30.0,
                        m: float | None = None, dropout: float = 0.0) -> nn.Module:
    """``kind`` in ``linear | arcface | cosface``; ``m=None`` takes the head's default."""
    kind = kind.lower()
    if kind == "linear":
        return LinearHead(in_features, num_classes, dropout=dropout)
    if kind == "arcface":
        return ArcFace(in_features, num_classes, s=s, m=0.5 if m is None else m)
    if kind == "cosface":
        return CosFace(in_features, num_classes, s=s, m=0.35 if m is None else m)
    raise ValueError(f"unknown identity head {kind!r} (linear | arcface | cosface)")


class MagLinear(nn.Module):
    """MagFace's classifier (Meng et al. 2021): ``(cos(theta_j), a)`` where ``a`` is the
    feature magnitude ``|emb|`` clamped to ``[l_a, u_a]`` (the margin and the
    regulariser of :class:`models.losses.MagFaceLoss` read it). The magnitude is
    not normalised away, so its gradient reaches the features; the cosines are
    float32 as in the other margin heads."""

    def __init__(self, in_features: int, num_classes: int, l_a: float = 10.0, u_a: float = 110.0):
        super().__init__()
        if num_classes < 1 or not 0 < l_a < u_a:
            raise ValueError(f"MagLinear needs num_classes >= 1 and 0 < l_a < u_a (got {num_classes}, {l_a}, {u_a})")
        self.in_features, self.num_classes, self.l_a, self.u_a = in_features, num_classes, float(l_a), float(u_a)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = emb.float()
        magnitude = emb.norm(dim=1).clamp(self.l_a, self.u_a)
        cos = F.linear(F.normalize(emb, dim=1), F.normalize(self.weight.float(), dim=1)).clamp(-1.0, 1.0)
        return cos, magnitude

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, l_a={self.l_a}, u_a={self.u_a}"
