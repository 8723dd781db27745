"""THz images (modalities ``thz``, ``thz_dense``) of a face drawn by
:mod:`shards.synthetic.faces`: a frontal source, geometry-dominated, blurred,
low contrast; thin fabric is nearly transparent, dense fabric hides most of
what it covers and shows its own weave."""
from __future__ import annotations

from typing import Any

import numpy as np

from .draw import _blur


def _to_uint8(img: np.ndarray, S: int, speck: np.ndarray) -> np.ndarray:
    """Blur, low contrast and speckle shared by every THz rendering, as 8-bit."""
    img = _blur(img, 0.9 * S / 64.0)
    img = 0.18 + 0.62 * img  # low contrast
    img = img * (1 + 0.02 * speck) + 0.006 * speck
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_thz(f: Any, depth: np.ndarray, normal: np.ndarray, feat: np.ndarray, glasses: np.ndarray,
               occ: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(thz, thz_dense, thz_target)`` (HxW uint8): through thin fabric, through
    dense fabric, unconcealed. ``f``: the face being drawn (``faces._Face``: its
    masks and grid); ``feat``: where facial features are; ``occ``: the
    concealment's mask. Draws the speckle from ``rng``."""
    face, hair, S = f.face, f.hair, f.S
    thz_alb = 0.62 * face + 0.45 * (hair + f.hair_back) * (1 - face) + 0.5 * (f.neck + f.ears) * (1 - face)
    thz_alb = np.clip(thz_alb - 0.3 * feat * face + 0.45 * glasses - 0.1 * hair * face, 0, 1.0)
    Lt = np.array([0.0, -0.35, 1.0], np.float32)
    Lt /= np.linalg.norm(Lt)
    shade_t = np.clip(normal @ Lt, 0, 1) ** 2
    base = (0.6 * shade_t + 0.4 * np.clip(depth / (f.lat["depth"] + 0.3), 0, 1.2)) * f.head_any
    thz_clean = 0.08 + 0.92 * base * (0.45 + 0.55 * thz_alb)
    speck = rng.normal(0, 1, (S, S)).astype(np.float32)
    fabric = (0.5 + 0.5 * np.sin(f.y * 55.0 + 6.0 * f.x)).astype(np.float32)

    def thin(occl):
        return _to_uint8(thz_clean * (1 - 0.1 * occl) + 0.04 * occl * fabric, S, speck)

    def dense(occl):
        # it absorbs most of the face's signal and shows its own weave, so the
        # unconcealed target has to be inferred, not copied
        return _to_uint8(thz_clean * (1 - 0.65 * occl) + occl * (0.12 + 0.14 * fabric), S, speck)

    target = thin(np.zeros_like(occ))
    if not f.sp["concealed"]:
        return target, target, target
    return thin(occ), dense(occ), target
