"""Drawing primitives on pixel grids (soft masks, ellipses, blur, alpha blending),
shared by the face and the ear renderers."""
from __future__ import annotations

import math

import numpy as np


def _inside(d, w):
    """Soft inside mask for a signed distance ``d`` (negative inside), edge width ``w``."""
    return np.clip(0.5 - d / w, 0.0, 1.0)


def _ellipse_d(x, y, cx, cy, rx, ry):
    return (np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) - 1.0) * min(rx, ry)


def _gauss(x, y, cx, cy, sx, sy):
    return np.exp(-(((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding (img: HxW or HxWxC)."""
    if sigma <= 0:
        return img
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    pad = [(r, r), (0, 0)] + [(0, 0)] * (img.ndim - 2)
    p = np.pad(img, pad, mode="edge")
    out = sum(k[i] * p[i:i + img.shape[0]] for i in range(2 * r + 1))
    pad = [(0, 0), (r, r)] + [(0, 0)] * (img.ndim - 2)
    p = np.pad(out, pad, mode="edge")
    return sum(k[i] * p[:, i:i + img.shape[1]] for i in range(2 * r + 1))


def _mix(base, color, alpha):
    """Alpha-blend ``color`` (RGB or HxWx3) over ``base`` (HxWx3, modified in place
    and returned) with an HxW ``alpha``; only the bounding box of alpha > 0 is touched."""
    on = alpha > 1e-3
    rows = np.flatnonzero(on.any(1))
    if rows.size == 0:
        return base
    cols = np.flatnonzero(on.any(0))
    r, c = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    color = np.asarray(color, np.float32)
    if color.ndim == 3:
        color = color[r, c]
    sub = base[r, c]
    sub += (color - sub) * alpha[r, c, None]
    return base
