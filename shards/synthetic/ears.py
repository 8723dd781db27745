"""Ears (modality ``ear``): a parametric ear per identity, posed, lit and partly
occluded, somewhere inside a larger image (:func:`render_ear`)."""
from __future__ import annotations

import math

import numpy as np

from .draw import _blur, _ellipse_d, _gauss, _inside, _mix
from .spec import SyntheticSpec
from .world import _HAIR, _SKIN_DARK, _SKIN_LIGHT, _rng


def _ear_identity(spec: SyntheticSpec, identity: int) -> dict[str, float]:
    """An identity's ear shape (ear frame: x forward-back, y up, height ~2)."""
    rng = _rng(spec.seed, 505, identity)
    return {"width": float(rng.uniform(0.52, 0.72)), "top": float(rng.uniform(0.85, 1.1)),
            "lobe": float(rng.uniform(0.18, 0.4)), "lobe_dx": float(rng.uniform(-0.12, 0.08)),
            "rim": float(rng.uniform(0.1, 0.2)), "anti_r": float(rng.uniform(0.42, 0.62)),
            "anti_y": float(rng.uniform(0.05, 0.3)), "anti_w": float(rng.uniform(0.05, 0.1)),
            "concha_r": float(rng.uniform(0.2, 0.34)), "concha_y": float(rng.uniform(-0.3, -0.05)),
            "concha_x": float(rng.uniform(-0.12, 0.05)), "tragus": float(rng.uniform(0.06, 0.14)),
            "tubercle": float(rng.uniform(-0.6, 1.0)), "tilt": float(rng.normal(0, 8.0)),
            "skin": float(rng.uniform(0, 1)), "hue": float(rng.normal(0, 0.03))}


def render_ear(spec: SyntheticSpec, identity: int, index: int) -> tuple[np.ndarray, list[float]]:
    """Sample ``index`` of ``identity``'s ear: an ``S x S x 3`` uint8 image (``S`` =
    ``spec.image_size``) with the ear at 40-65 % of the height somewhere in it, and the
    ear's box ``[x1, y1, x2, y2]`` (pixels, x2/y2 exclusive, tight around the ear shape).
    Pose (roll, scale, yaw squash), light, background skin/hair, occlusion (hair
    strands or an earring) and noise vary per sample."""
    e = _ear_identity(spec, identity)
    rng = _rng(spec.seed, 606, identity, index)
    S = spec.image_size
    height = rng.uniform(0.4, 0.65) * S                    # ear height in pixels
    squash = rng.uniform(0.78, 1.0)                        # yaw
    cx = rng.uniform(0.5 * e["width"] * height * 0.6, S - 0.5 * e["width"] * height * 0.6)
    cy = rng.uniform(0.55 * height, S - 0.55 * height)
    roll = math.radians(e["tilt"] + rng.normal(0, 10.0))
    y_img, x_img = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    dx, dy = (x_img - cx) / (height / 2), (y_img - cy) / (height / 2)
    c, s = math.cos(roll), math.sin(roll)
    u = (c * dx + s * dy) / squash                          # ear frame, u: towards the back
    v = -(-s * dx + c * dy)                                 # up
    px = 2.0 / height
    # outline: an upper ellipse (helix) joined to a lobe ellipse, with an optional tubercle
    upper = _ellipse_d(u, v, 0.0, 0.1, e["width"], e["top"])
    lobe = _ellipse_d(u, v, e["lobe_dx"], -0.75, e["width"] * 0.62, e["lobe"] + 0.2)
    bump = _ellipse_d(u, v, e["width"] * 0.8, 0.55, 0.14, 0.14) if e["tubercle"] > 0 else np.ones_like(u)
    outline = np.minimum(np.minimum(upper, lobe), bump)
    ear = _inside(outline, px)
    # relief: helix rim, antihelix ridge, concha bowl, tragus bump
    rim = np.exp(-((outline + e["rim"]) / (0.5 * e["rim"])) ** 2) * ear
    ar = np.sqrt((u / 0.9) ** 2 + (v - e["anti_y"]) ** 2)
    anti = np.exp(-((ar - e["anti_r"]) / e["anti_w"]) ** 2) * (u > -0.25) * ear
    concha = _gauss(u, v, e["concha_x"], e["concha_y"], e["concha_r"], e["concha_r"] * 1.3)
    tragus = _gauss(u, v, -e["width"] * 0.95, e["concha_y"] - 0.1, e["tragus"], e["tragus"] * 1.4)
    h = (1.0 * rim + 0.7 * anti - 0.9 * concha) * ear + 0.6 * tragus + 0.25 * ear
    gy, gx = np.gradient(_blur(h.astype(np.float32), 0.8))
    nx, ny = -gx * height * 0.08, -gy * height * 0.08
    norm = np.sqrt(nx * nx + ny * ny + 1.0)
    az = rng.uniform(-math.pi, math.pi)
    el = rng.uniform(0.5, 1.2)
    L = np.array([math.cos(az) * math.cos(el), math.sin(az) * math.cos(el), math.sin(el)], np.float32)
    shade = np.clip((nx * L[0] + ny * L[1] + L[2]) / norm, 0, 1)
    light = rng.uniform(0.6, 1.0)
    skin = _SKIN_LIGHT * (1 - e["skin"]) + _SKIN_DARK * e["skin"]
    ear_col = np.clip(skin * (1 + e["hue"]) * np.array([1.04, 0.97, 0.95], np.float32), 0, 1)
    bg_skin = np.clip(skin * rng.uniform(0.85, 1.05), 0, 1)
    bg = np.broadcast_to(bg_skin, (S, S, 3)) * (0.75 + 0.25 * (y_img / S))[..., None]
    hair_col = _HAIR[int(rng.integers(len(_HAIR)))]
    hair_line = rng.uniform(0.0, 0.35) * S + 0.15 * S * np.sin(x_img / S * rng.uniform(2, 6) + rng.uniform(0, 6))
    bg = _mix(bg.copy(), hair_col, _inside(y_img - hair_line, 1.5) * 1.0)
    lit = ear_col * (0.35 + 0.75 * shade[..., None]) * light
    lit = lit * (1 - 0.35 * concha[..., None] * ear[..., None])
    img = _mix(bg * (0.5 + 0.5 * light), lit, ear)
    occl = rng.random()
    if occl < 0.25:  # hair strands across the top of the ear
        strands = (np.sin(x_img * rng.uniform(0.8, 1.6) + rng.uniform(0, 6)) > 0.3)
        band = _inside(y_img - (cy - height * rng.uniform(0.1, 0.45)), 1.0)
        img = _mix(img, hair_col, (strands * band).astype(np.float32) * 0.9)
    elif occl < 0.4:  # an earring at the lobe
        ey, ex = cy + 0.45 * height * math.cos(roll), cx + 0.45 * height * math.sin(roll)
        ring = _inside(np.abs(np.hypot(x_img - ex, y_img - ey) - 0.06 * height) - 0.02 * height - 0.5, 1.0)
        img = _mix(img, np.array([0.85, 0.75, 0.3], np.float32), ring.astype(np.float32))
    img = np.clip(img + rng.normal(0, rng.uniform(0.005, 0.03), size=img.shape), 0, 1)
    rows, cols = np.nonzero(ear > 0.5)
    box = ([float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)] if rows.size
           else [0.0, 0.0, float(S), float(S)])
    return (img * 255 + 0.5).astype(np.uint8), box
