"""The built-in synthetic biometric dataset.

Faces are drawn procedurally (NumPy only, no GPU, deterministic by seed):
each identity has a latent face geometry (face outline and jaw, eyes, brows,
nose, mouth, ears, skin tone, hair, moles) from which a height field and an
albedo map are evaluated on a pixel grid; the visible image is the albedo lit
by a per-sample light through the normals of the height field. So the same
code gives the photometric-stereo maps (albedo, unit normals, depth) and a
THz-like rendering of the same capture (frontal illumination, blurred, low
contrast, fabric nearly transparent).

Modalities (``SyntheticSpec.modalities``, :data:`MODALITIES`): ``vis``
(``vis.png``), ``vis_target`` (``vis_target.png``: the same capture without
the concealment), ``thz`` (``thz.png`` through thin fabric + ``thz_target.png``
unconcealed), ``thz_dense`` (``thz.png`` through dense fabric that hides most
of the lower face + ``thz_target.png``; the THz recipes' default, since thin
fabric leaves nothing to reconstruct), ``maps`` (albedo / normal / depth) and
``ear`` (``ear.png``: a parametric ear of the identity, posed, lit and partly
occluded, somewhere inside a larger image; its box in the json as ``ear_bbox``
``[x1, y1, x2, y2]``, x2/y2 exclusive; :func:`render_ear`).
Adding a modality never changes the bytes of the others for the same spec.

Per sample: one of five head postures (the face frame is rotated in 3D and
the image is ray-traced back onto the height field), an emotion (mouth curve,
brows, eye opening), spectacles, concealment (a scarf or mask over the lower
face), and jitter (pose, scale, shift, light, colour, noise). Twins share their
latent face and differ in small details (a mole, brows, nose width, hair
part). Gender changes the geometry (jaw width/shape, brows, nose, hair length)
so it is learnable from the pixels.

``ensure_synthetic(root, spec)`` writes ``root/synthetic-<hash>/`` once
(built in a temporary directory, then renamed). ``render_sample(spec, i, k)``
draws one sample to NumPy arrays for tests. ``python -m shards.synthetic
--out DIR --preview preview.png`` builds the dataset and/or a picture grid.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import staging_path, sweep_stale_staging
from .manifest import FORMAT, TOOL_VERSION, Manifest
from .writer import ShardSplitWriter

GENERATOR_VERSION = 2  # bump when the drawing changes: it is part of the dataset hash

LABEL_SCHEMAS: dict[str, list[str]] = {
    "gender": ["female", "male"],
    "emotion": ["neutral", "happy", "sad", "angry", "surprised"],
    "facial_hair": ["none", "moustache", "beard"],
    "spectacles": ["none", "glasses"],
    "posture": ["front", "left", "right", "up", "down"],
    "concealed": ["unconcealed", "concealed"],
}

# vis: visible image (concealed when the sample is); vis_target: the same capture unconcealed;
# thz: THz image through thin fabric (concealment barely visible) + thz_target (unconcealed);
# thz_dense: THz through dense fabric, written as thz.png + thz_target.png (so it replaces thz);
# maps: photometric-stereo albedo / normal / depth.
# ear: an ear photo (ear.png, ear inside a larger image) + json ear_bbox (render_ear).
MODALITIES = ("vis", "vis_target", "thz", "thz_dense", "maps", "ear")

# yaw (deg, + turns the face to image-right) and pitch (deg, + looks up) per posture
_POSTURE_ANGLES = {0: (0.0, 0.0), 1: (-28.0, 0.0), 2: (28.0, 0.0), 3: (0.0, 22.0), 4: (0.0, -22.0)}


@dataclass(frozen=True)
class SyntheticSpec:
    num_identities: int = 40
    samples_per_identity: int = 20
    twin_fraction: float = 0.25  # fraction of identities that are in twin pairs
    image_size: int = 64
    modalities: tuple[str, ...] = ("vis", "thz", "maps")
    splits: tuple[tuple[str, float], ...] = (("train", 0.7), ("val", 0.15), ("test", 0.15))
    split_by: str = "sample"  # "sample": closed set; "identity": identity-disjoint splits
    seed: int = 0
    maxcount: int = 200  # samples per shard

    def __post_init__(self):
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "splits", tuple((str(n), float(r)) for n, r in
                                                 (self.splits.items() if isinstance(self.splits, dict)
                                                  else self.splits)))
        bad = set(self.modalities) - set(MODALITIES)
        if bad or not self.modalities:
            raise ValueError(f"modalities must be a non-empty subset of {', '.join(MODALITIES)}; "
                             f"got {self.modalities}")
        if {"thz", "thz_dense"} <= set(self.modalities):
            raise ValueError("modalities thz and thz_dense both write thz.png: choose one")
        if self.split_by not in ("sample", "identity"):
            raise ValueError(f"split_by must be 'sample' or 'identity', got {self.split_by!r}")
        if self.num_identities < 1 or self.samples_per_identity < 1:
            raise ValueError("num_identities and samples_per_identity must be >= 1")
        if not 0.0 <= self.twin_fraction <= 1.0:
            raise ValueError(f"twin_fraction must be in [0, 1], got {self.twin_fraction}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if not self.splits or any(r < 0 for _, r in self.splits) or sum(r for _, r in self.splits) <= 0:
            raise ValueError(f"bad split ratios {self.splits}")
        if len({n for n, _ in self.splits}) != len(self.splits):
            raise ValueError(f"duplicate split names in {self.splits}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["modalities"] = list(self.modalities)
        d["splits"] = [[n, r] for n, r in self.splits]
        return d


def spec_hash(spec: SyntheticSpec) -> str:
    text = json.dumps({"spec": spec.to_dict(), "generator": GENERATOR_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------
# identities
# ---------------------------------------------------------------------------
_SKIN_LIGHT = np.array([0.96, 0.80, 0.69], np.float32)
_SKIN_DARK = np.array([0.42, 0.28, 0.20], np.float32)
_HAIR = np.array([[0.08, 0.06, 0.05], [0.25, 0.15, 0.08], [0.45, 0.30, 0.15], [0.80, 0.65, 0.38],
                  [0.55, 0.22, 0.10], [0.62, 0.60, 0.58]], np.float32)
_IRIS = np.array([[0.30, 0.18, 0.08], [0.25, 0.42, 0.62], [0.30, 0.45, 0.25], [0.45, 0.33, 0.15]], np.float32)


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]))


def _draw_identity(rng: np.random.Generator, gender: int) -> dict[str, Any]:
    m = float(gender)
    n = rng.normal
    lat: dict[str, Any] = {
        "gender": gender,
        "fw": 0.47 + 0.06 * m + 0.025 * n(),
        "fh": 0.64 + 0.02 * m + 0.03 * n(),
        "jaw_n": 2.0 + 0.9 * m + 0.2 * abs(n()),
        "top_n": 2.05 + 0.15 * rng.random(),
        "chin": 0.5 + 0.5 * rng.random(),
        "skin_t": float(rng.beta(1.3, 1.6)),
        "skin_hue": 0.04 * n(),
        "eye_y": -0.07 + 0.03 * n(),
        "eye_dx": 0.185 + 0.02 * n(),
        "eye_rw": 0.082 + 0.010 * n(),
        "eye_rh": 0.040 + 0.006 * n(),
        "iris": int(rng.integers(len(_IRIS))),
        "iris_r": 0.030 + 0.003 * n(),
        "brow_dy": 0.072 + 0.012 * n(),
        "brow_th": 0.016 + 0.009 * m + 0.004 * abs(n()),
        "brow_len": 0.10 + 0.015 * n(),
        "brow_arch": 0.6 + 0.3 * n(),
        "nose_len": 0.25 + 0.02 * m + 0.03 * n(),
        "nose_w": 0.058 + 0.012 * m + 0.010 * n(),
        "nose_h": 0.16 + 0.03 * m + 0.03 * n(),
        "mouth_dy": 0.11 + 0.02 * n(),  # mouth below the nose tip
        "mouth_w": 0.14 + 0.01 * m + 0.018 * n(),
        "lip_th": 0.030 - 0.007 * m + 0.005 * n(),
        "hair": int(rng.choice(len(_HAIR), p=[0.3, 0.25, 0.15, 0.12, 0.08, 0.10])),
        "hairline": -0.36 + 0.05 * n() + (0.05 * rng.random() if m else 0.0),
        "fringe": float(rng.random() < (0.25 if m else 0.45)) * (0.10 + 0.08 * rng.random()),
        "part": float(rng.uniform(-0.6, 0.6)),
        "hair_vol": 0.05 + 0.05 * rng.random() + 0.04 * (1 - m),
        "hair_len": (0.55 + 0.35 * rng.random()) if not m else (-0.02 + 0.08 * rng.random()),
        "ear_r": 0.085 + 0.01 * n(),
        "neck_w": 0.22 + 0.05 * m + 0.02 * n(),
        "cheek": float(rng.random()),
        "depth": 0.50 + 0.04 * n(),
        "facial_hair": int(rng.choice(3, p=[0.45, 0.2, 0.35])) if m else 0,
        "glasses_p": 0.8 if rng.random() < 0.3 else 0.08,
        "mole": None,
    }
    if rng.random() < 0.35:
        lat["mole"] = (float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.2, 0.4)), 0.014)
    return lat


def _twin_of(lat: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """A co-twin: the same face with small differences."""
    t = dict(lat)
    t["brow_th"] = lat["brow_th"] * (1.0 + rng.choice([-1, 1]) * rng.uniform(0.15, 0.3))
    t["nose_w"] = lat["nose_w"] * (1.0 + rng.choice([-1, 1]) * rng.uniform(0.06, 0.12))
    t["eye_rh"] = lat["eye_rh"] * (1.0 + rng.choice([-1, 1]) * rng.uniform(0.05, 0.1))
    t["part"] = -lat["part"]
    t["skin_t"] = float(np.clip(lat["skin_t"] + rng.normal(0, 0.03), 0, 1))
    # one twin has a mole where the other has none (or elsewhere)
    t["mole"] = (float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.15, 0.35)), 0.016)
    if lat["mole"] is None or rng.random() < 0.5:
        pass
    else:
        t["mole"] = None
    if lat["gender"] == 1 and rng.random() < 0.3:
        t["facial_hair"] = int(rng.integers(3))
    return t


@dataclass(frozen=True)
class _World:
    latents: tuple[dict[str, Any], ...]
    twins: tuple[int, ...]  # co-twin index or -1
    twin_pairs: tuple[tuple[int, int], ...]
    names: tuple[str, ...]


_WORLD_CACHE: dict[SyntheticSpec, _World] = {}


def _world(spec: SyntheticSpec) -> _World:
    if spec in _WORLD_CACHE:
        return _WORLD_CACHE[spec]
    n = spec.num_identities
    rng = _rng(spec.seed, 101)
    n_twin = int(round(spec.twin_fraction * n)) // 2 * 2
    twin_ids = sorted(rng.permutation(n)[:n_twin].tolist())
    order = rng.permutation(twin_ids).tolist()
    pairs = sorted(tuple(sorted((order[2 * k], order[2 * k + 1]))) for k in range(n_twin // 2))
    twins = [-1] * n
    for a, b in pairs:
        twins[a], twins[b] = b, a
    genders = rng.integers(0, 2, size=n)
    latents: list[dict[str, Any] | None] = [None] * n
    for i in range(n):
        if latents[i] is not None:
            continue
        lat = _draw_identity(_rng(spec.seed, 202, i), int(genders[i]))
        latents[i] = lat
        if twins[i] >= 0:
            latents[twins[i]] = _twin_of(lat, _rng(spec.seed, 303, i))
    w = _World(latents=tuple(latents), twins=tuple(twins), twin_pairs=tuple(pairs),
               names=tuple(f"syn{i:05d}" for i in range(n)))
    _WORLD_CACHE[spec] = w
    return w


# ---------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------
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


def _face_radius(lat, x, y):
    """Normalised radius of the face outline (superellipse; squarer jaw below)."""
    fw, fh = lat["fw"], lat["fh"]
    n = np.where(y > 0, np.float32(lat["jaw_n"]), np.float32(lat["top_n"]))
    ax = np.abs(x) / fw
    # the chin narrows the lower face a little more towards the bottom
    ax = ax * (1.0 + 0.25 * lat["chin"] * np.clip(y / fh, 0, 1) ** 2)
    return (ax ** n + (np.abs(y) / fh) ** n) ** (1.0 / n)


def _geometry_height(lat, x, y):
    """The coarse height field (head dome + nose) used to trace the pose."""
    fw, fh, D = lat["fw"], lat["fh"], lat["depth"]
    rho2 = (x / (fw * 1.08)) ** 2 + ((y + 0.06) / (fh * 1.15)) ** 2
    dome = D * np.clip(1.0 - rho2, 0.0, None) ** 0.75
    ey, nl, nw, nh = lat["eye_y"], lat["nose_len"], lat["nose_w"], lat["nose_h"]
    t = (y - ey) / nl
    tc = np.clip(t, 0.0, 1.0)
    ridge = nh * tc ** 1.3 * np.exp(-(x / (nw * (0.45 + 0.7 * tc))) ** 2)
    ridge = ridge * np.where(t > 1.0, np.exp(-((t - 1.0) * nl / 0.025) ** 2), 1.0)
    ridge = ridge * (t > -0.2)
    tip = 0.25 * nh * _gauss(x, y, 0.0, ey + nl - 0.01, nw * 0.9, nw * 0.8)
    return dome + ridge + tip


def _detail_height(lat, x, y, emo):
    ey, edx, erw = lat["eye_y"], lat["eye_dx"], lat["eye_rw"]
    h = np.zeros_like(x)
    for s in (-1.0, 1.0):
        h -= 0.045 * _gauss(x, y, s * edx, ey, erw * 1.5, erw * 1.1)  # eye sockets
        h += 0.03 * _gauss(x, y, s * edx, ey - lat["brow_dy"] - 0.01, erw * 1.6, 0.035)  # brow ridge
        h += 0.025 * lat["cheek"] * _gauss(x, y, s * lat["fw"] * 0.55, ey + 0.2, 0.12, 0.1)
        # nose wings
        h += 0.03 * _gauss(x, y, s * lat["nose_w"] * 0.9, ey + lat["nose_len"], 0.03, 0.025)
    my = ey + lat["nose_len"] + lat["mouth_dy"]
    h += 0.03 * _gauss(x, y, 0.0, my, lat["mouth_w"] * 0.9, 0.04)  # lips
    h -= 0.02 * _gauss(x, y, 0.0, my + 0.07, lat["mouth_w"] * 0.8, 0.025)  # under-lip groove
    h += 0.05 * _gauss(x, y, 0.0, lat["fh"] * 0.85, 0.11, 0.07)  # chin
    return h


def _hair_mask(lat, x, y, px):
    fw, fh, vol = lat["fw"], lat["fh"], lat["hair_vol"]
    skull = _inside(_ellipse_d(x, y, 0.0, -0.1, fw * 1.05 + vol, fh * 1.08 + vol), px)
    side_y = lat["eye_y"] - 0.02 if lat["gender"] else lat["eye_y"] + 0.12
    ax = np.clip(np.abs(x) / fw, 0, 1.5)
    hl = lat["hairline"] + (side_y - lat["hairline"]) * ax ** 3
    # fringe: the hair comes down over the forehead, wavy edge
    fr = lat["fringe"]
    if fr > 0:
        wav = 0.02 * np.sin(x * 38.0 + 3.0 * lat["part"])
        hl = hl + fr * np.clip(1.0 - (x - lat["part"] * fw * 0.5) ** 2 / (fw * 0.9) ** 2, 0, 1) + wav * (fr > 0)
    front = skull * _inside(y - hl, px)
    back = np.zeros_like(front)
    if lat["hair_len"] > 0.1:  # long hair: a curtain behind the face and neck
        outer = fw * 1.06 + vol + 0.03 * (1.0 + np.clip(y, 0, 1))
        bottom = lat["hair_len"] - 0.12 * (np.abs(x) / (fw + vol)) ** 2 + 0.02 * np.sin(x * 30.0)
        back = _inside(np.abs(x) - outer, px) * _inside(y - bottom, px) * (y > -0.3)
        back = np.maximum(back, skull)
    return front, back


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


def _sample_params(spec: SyntheticSpec, identity: int, index: int) -> dict[str, Any]:
    lat = _world(spec).latents[identity]
    rng = _rng(spec.seed, 404, identity, index)
    posture = int((index + identity) % 5)
    return {
        "posture": posture,
        "emotion": int(rng.integers(5)),
        "concealed": int(rng.random() < 0.5),
        "spectacles": int(rng.random() < lat["glasses_p"]),
        "yaw": _POSTURE_ANGLES[posture][0] + float(rng.normal(0, 3.0)),
        "pitch": _POSTURE_ANGLES[posture][1] + float(rng.normal(0, 3.0)),
        "roll": float(rng.normal(0, 4.0)),
        "scale": float(rng.uniform(0.93, 1.05)),
        "shift": [float(t) for t in rng.normal(0, 0.035, size=2)],
        "light_az": float(rng.uniform(-0.9, 0.9)),
        "light_el": float(rng.uniform(0.35, 0.9)),
        "light_i": float(rng.uniform(0.75, 1.05)),
        "ambient": float(rng.uniform(0.25, 0.4)),
        "tint": rng.normal(0, 0.04, size=3).astype(np.float32),
        "bg": (rng.uniform(0.2, 0.75, size=3) * 0.6 + 0.2).astype(np.float32),
        "noise": float(rng.uniform(0.008, 0.025)),
        "occ_color": rng.uniform(0.1, 0.95, size=3).astype(np.float32),
        "occ_kind": int(rng.integers(2)),
        "occ_top": float(rng.normal(0.0, 0.015)),
        "frame": (rng.uniform(0.02, 0.3, size=3) if rng.random() < 0.7
                  else np.array([0.7, 0.7, 0.72])).astype(np.float32),
        "gaze": [float(t) for t in rng.normal(0, 0.008, size=2)],
        "rng_seed": int(rng.integers(2 ** 31)),
    }


def render_sample(spec: SyntheticSpec, identity: int, index: int) -> dict[str, Any]:
    """Draw sample ``index`` of ``identity``: a dict with ``vis``/``vis_target`` (HxWx3
    uint8; ``vis_target`` without the concealment), ``thz``/``thz_dense``/``thz_target``
    (HxW uint8; thin fabric, dense fabric, unconcealed), ``albedo``/``normal`` (HxWx3 float32),
    ``depth`` (HxW float32) and ``labels`` (the json label dict)."""
    w = _world(spec)
    lat = w.latents[identity]
    sp = _sample_params(spec, identity, index)
    S = spec.image_size
    px = 2.0 / S  # one pixel in face units
    aa = 1.2 * px
    rng = _rng(sp["rng_seed"])

    # image grid -> head frame (similarity jitter) -> face frame (3D pose, traced on the height field)
    c = (np.arange(S, dtype=np.float32) + 0.5) * px - 1.0
    v, u = np.meshgrid(c, c, indexing="ij")
    ang = math.radians(sp["roll"])
    uu = (u - sp["shift"][0]) / sp["scale"]
    vv = (v - sp["shift"][1]) / sp["scale"] - 0.1
    ur = math.cos(ang) * uu + math.sin(ang) * vv
    vr = -math.sin(ang) * uu + math.cos(ang) * vv
    a, b = math.radians(sp["yaw"]), math.radians(sp["pitch"])
    ca, sa, cb, sb = math.cos(a), math.sin(a), math.cos(b), math.sin(b)
    x, y = ur.copy(), vr.copy()
    n_iter = 2 if abs(sa) + abs(sb) < 0.15 else 5
    for _ in range(n_iter):  # fixed point: project(x, y, H(x, y)) == (ur, vr), damped
        z = _geometry_height(lat, x, y)
        z1 = -x * sa + z * ca
        xn = (ur - z * sa) / ca
        yn = (vr + z1 * sb) / cb
        x, y = 0.5 * (x + xn), 0.5 * (y + yn)

    emo = sp["emotion"]
    fw, fh = lat["fw"], lat["fh"]
    ey, edx = lat["eye_y"], lat["eye_dx"]
    tip_y = ey + lat["nose_len"]
    my = tip_y + lat["mouth_dy"]

    # --- masks ---------------------------------------------------------------
    face = _inside((_face_radius(lat, x, y) - 1.0) * fw, aa)
    hair, hair_back = _hair_mask(lat, x, y, aa)
    ears = np.zeros_like(x)
    for s in (-1.0, 1.0):
        ears = np.maximum(ears, _inside(_ellipse_d(x, y, s * fw * 0.98, ey + 0.09, lat["ear_r"] * 0.55,
                                                   lat["ear_r"]), aa))
    nw_ = lat["neck_w"] + 0.25 * np.clip(y - 0.8, 0, None) ** 2 * 8  # flares into the shoulders
    neck = _inside(np.abs(x) - nw_, aa) * _inside(fh * 0.4 - y, aa)
    head_any = np.maximum.reduce([face, hair, hair_back, ears, neck])

    # --- height (face frame), then image-space depth --------------------------
    h_face = _geometry_height(lat, x, y) + _detail_height(lat, x, y, emo) * face
    h_face = h_face + lat["hair_vol"] * 0.6 * hair
    h_neck = 0.22 * np.sqrt(np.clip(1 - (x / (nw_ + 0.05)) ** 2, 0, 1))
    h_back = 0.12 * np.sqrt(np.clip(1 - (x / (fw * 1.3 + lat["hair_vol"])) ** 2, 0, 1))
    skull_in = np.maximum(face, hair)
    h = h_face * skull_in + (1 - skull_in) * np.maximum(h_neck * neck, h_back * hair_back)
    z1 = -x * sa + h * ca
    inside = head_any > 0.01
    depth = y * sb + z1 * cb
    if inside.any():
        depth = depth - depth[inside].min()
    depth = np.where(inside, depth + 0.02, 0.0).astype(np.float32) * np.clip(head_any * 1.5, 0, 1)
    depth = _blur(depth, 0.5)
    gy, gx = np.gradient(depth, px)
    gx, gy = np.clip(gx, -1.8, 1.8), np.clip(gy, -1.8, 1.8)  # soft silhouettes
    normal = np.stack([-gx, -gy, np.ones_like(gx)], -1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)

    # --- albedo ----------------------------------------------------------------
    skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * lat["skin_t"]
    skin = np.clip(skin * (1 + np.array([lat["skin_hue"], 0, -lat["skin_hue"]], np.float32)), 0, 1)
    hair_c = _HAIR[lat["hair"]]
    bgc = np.asarray(sp["bg"], np.float32)
    albedo = np.broadcast_to(bgc, (S, S, 3)) * (1.0 - 0.25 * (v[..., None] + 1) / 2)
    albedo = (albedo + rng.normal(0, 0.01, (S, S, 1))).astype(np.float32)  # owned: _mix works in place
    strands = 1.0 + 0.07 * np.sin((x * 45.0 + 5.0 * np.sin(y * 7.0)) + lat["part"] * 5)[..., None]
    albedo = _mix(albedo, hair_c * 0.8 * strands, hair_back)
    albedo = _mix(albedo, skin * 0.88, neck)
    albedo = _mix(albedo, skin * 0.95, ears)
    skin_map = np.broadcast_to(skin, (S, S, 3)).copy()
    # cheeks and eye-socket shading on the skin itself
    for s in (-1.0, 1.0):
        skin_map = _mix(skin_map, skin * np.array([1.05, 0.85, 0.85], np.float32),
                        0.25 * (1 - lat["gender"] * 0.7) * _gauss(x, y, s * fw * 0.55, ey + 0.2, 0.1, 0.08))
        skin_map = _mix(skin_map, skin * 0.8, 0.35 * _gauss(x, y, s * edx, ey - 0.01, lat["eye_rw"] * 1.5,
                                                             lat["eye_rw"] * 1.0))
    albedo = _mix(albedo, skin_map, face)

    feat = np.zeros((S, S), np.float32)  # where facial features are (for THz albedo)
    # eyes
    open_ = {0: 1.0, 1: 0.75, 2: 0.85, 3: 0.8, 4: 1.4}[emo]
    for s in (-1.0, 1.0):
        cx = s * edx
        rw, rh = lat["eye_rw"], max(lat["eye_rh"] * open_, 0.012)
        dx = x - cx
        yy = y - ey + 0.25 * rh * (dx / rw) * s * 0.4
        eye = _inside(_ellipse_d(dx, yy * (1 + 0.3 * (yy > 0)), 0, 0, rw, rh), aa * 0.8) * face
        albedo = _mix(albedo, np.array([0.93, 0.91, 0.88], np.float32) * 0.95, eye)
        ix, iy = cx + sp["gaze"][0], ey + sp["gaze"][1]
        iris = _inside(_ellipse_d(x, y, ix, iy, lat["iris_r"], lat["iris_r"]), aa * 0.8) * eye
        albedo = _mix(albedo, _IRIS[lat["iris"]], iris)
        pupil = _inside(_ellipse_d(x, y, ix, iy, lat["iris_r"] * 0.45, lat["iris_r"] * 0.45), aa * 0.8) * eye
        albedo = _mix(albedo, np.array([0.03, 0.03, 0.03], np.float32), pupil)
        lid = _inside(np.abs(_ellipse_d(dx, yy, 0, 0, rw * 1.05, rh * 1.1)) - 0.006, aa) * (yy < 0.004) * face
        albedo = _mix(albedo, np.array([0.12, 0.08, 0.07], np.float32), 0.85 * lid)
        feat = np.maximum(feat, eye)
        # brows: inner end at t=-1, outer end at t=+1
        t = (x - cx) * s / lat["brow_len"]
        byc = ey - lat["brow_dy"] - 0.02 * lat["brow_arch"] * (1 - t ** 2)
        byc = byc + {0: 0.0, 1: -0.008, 2: -0.035 * (1 - t) / 2, 3: 0.045 * (1 - t) / 2 - 0.005,
                     4: -0.04}[emo]
        th = lat["brow_th"] * (1.0 - 0.35 * (t + 1) / 2)
        brow = _inside(np.abs(y - byc) - th / 2, aa) * _inside(np.abs(t) - 1.0, 2 * aa / lat["brow_len"]) * face
        albedo = _mix(albedo, hair_c * 0.7, 0.9 * brow)
        feat = np.maximum(feat, brow)
        # nostrils
        nos = _inside(_ellipse_d(x, y, s * lat["nose_w"] * 0.5, tip_y + 0.018, 0.018, 0.009), aa) * face
        albedo = _mix(albedo, skin * 0.3, 0.8 * nos)

    # mouth
    mw = lat["mouth_w"] * (1.12 if emo == 1 else 1.0) * (0.8 if emo == 4 else 1.0)
    tx = x / mw
    inside_t = _inside(np.abs(tx) - 1.0, aa / mw)
    curv = {0: 0.005, 1: 0.05, 2: -0.045, 3: -0.015, 4: 0.0}[emo]
    yc = my - curv * tx ** 2 + curv * 0.5  # corners up for curv > 0 (image y points down)
    wt = np.sqrt(np.clip(1 - tx ** 2, 0, 1))
    lip_up = lat["lip_th"] * (0.8 if emo == 3 else 1.0)
    lip_lo = lat["lip_th"] * 1.25 * (0.8 if emo == 3 else 1.0)
    lips_c = skin * 0.72 + np.array([0.55, 0.12, 0.15], np.float32) * (0.28 + 0.12 * (1 - lat["gender"]))
    if emo == 4:  # surprised: open "O"
        outer = _inside(_ellipse_d(x, y, 0, my + 0.012, mw * 0.62, 0.055), aa) * face
        inner = _inside(_ellipse_d(x, y, 0, my + 0.012, mw * 0.45, 0.035), aa) * face
        albedo = _mix(albedo, lips_c, outer)
        albedo = _mix(albedo, np.array([0.12, 0.03, 0.04], np.float32), inner)
        mouth = outer
    else:
        lips = inside_t * _inside(y - (yc + lip_lo * wt), aa) * _inside((yc - lip_up * wt) - y, aa) * face
        albedo = _mix(albedo, lips_c, lips)
        gap = 0.004 + (0.012 * wt if emo == 1 else 0.0)
        line = inside_t * _inside(np.abs(y - yc - gap / 2) - gap / 2, aa * 0.7) * face
        if emo == 1:  # smile shows teeth
            albedo = _mix(albedo, np.array([0.9, 0.88, 0.82], np.float32), line * (wt > 0.2))
            albedo = _mix(albedo, np.array([0.25, 0.05, 0.05], np.float32),
                          inside_t * _inside(np.abs(y - yc - gap) - 0.002, aa * 0.5) * face)
        else:
            albedo = _mix(albedo, np.array([0.2, 0.05, 0.06], np.float32), 0.9 * line)
        mouth = lips
    feat = np.maximum(feat, mouth)

    if lat["mole"] is not None:
        mx, myy, mr = lat["mole"]
        albedo = _mix(albedo, skin * 0.35, _inside(_ellipse_d(x, y, mx * fw, myy, mr, mr), aa) * face)

    # facial hair
    fhair = lat["facial_hair"]
    if fhair:
        tex = (0.75 + 0.25 * rng.random((S, S))).astype(np.float32)
        tm = x / (mw * 1.3)
        mous = (_inside(np.abs(tm) - 1.0, aa / mw) * _inside(y - (my - 0.6 * lip_up + 0.05 * tm ** 2), aa)
                * _inside((tip_y + 0.028 + 0.03 * tm ** 2) - y, aa) * face)
        cover = mous
        if fhair == 2:
            jaw = _inside((my - 0.03 + 0.25 * (np.abs(x) / fw) ** 1.5 * -1.0) - y, -aa) * face
            jaw = jaw * (1 - _inside(_ellipse_d(x, y, 0, my + 0.01, mw * 1.05, lip_lo + 0.012), aa))
            side = _inside(np.abs(x) - fw * 0.72, -aa) * (y > ey + 0.05) * face
            cover = np.maximum(cover, np.maximum(jaw, side))
            if emo == 4:
                cover = cover * (1 - mouth)
        albedo = _mix(albedo, hair_c * 0.6 * tex[..., None], 0.85 * cover)
        feat = np.maximum(feat, cover * 0.5)

    # hair in front of the face
    albedo = _mix(albedo, hair_c * strands, hair)

    # spectacles
    glasses = np.zeros((S, S), np.float32)
    if sp["spectacles"]:
        fr = np.asarray(sp["frame"], np.float32)
        lens = np.zeros((S, S), np.float32)
        for s in (-1.0, 1.0):
            d = _ellipse_d(x, y, s * edx, ey + 0.005, lat["eye_rw"] * 1.55, 0.062)
            ring = _inside(np.abs(d) - 0.009, aa)
            lens = np.maximum(lens, _inside(d, aa))
            glasses = np.maximum(glasses, ring)
            temple = (_inside(np.abs(y - (ey - 0.02)) - 0.008, aa)
                      * (np.abs(x) > edx + lat["eye_rw"] * 1.5) * (np.abs(x) < fw * 1.02) * (x * s > 0))
            glasses = np.maximum(glasses, temple)
        inner = edx - lat["eye_rw"] * 1.5
        bridge = _inside(np.abs(y - (ey - 0.015)) - 0.007, aa) * (np.abs(x) < inner + 0.01)
        glasses = np.maximum(glasses, bridge)
        glasses = glasses * np.maximum(face, hair * 0.0 + (np.abs(x) < fw * 1.05))
        albedo = albedo * (1 - 0.12 * lens[..., None])
        albedo = _mix(albedo, fr, glasses)

    # concealment over the lower face (a scarf or a mask)
    occ = np.zeros((S, S), np.float32)
    albedo_bare = albedo.copy() if sp["concealed"] else albedo  # _mix below works in place
    if sp["concealed"]:
        top = tip_y - 0.02 + sp["occ_top"] + 0.05 * (x / fw) ** 2
        width = fw * (1.08 if sp["occ_kind"] == 0 else 1.0)
        occ = _inside(top - y, aa) * _inside(np.abs(x) - width - 0.1 * np.clip(y - fh * 0.6, 0, None), aa)
        occ = occ * np.maximum(face, np.maximum(neck, (y > fh * 0.3) * _inside(np.abs(x) - width, aa)))
        oc = np.asarray(sp["occ_color"], np.float32)
        if sp["occ_kind"] == 0:  # scarf: folds
            folds = 1.0 + 0.15 * np.sin(y * 55.0 + 6.0 * x)[..., None]
        else:  # mask: pleats
            folds = 1.0 - 0.12 * (np.sin(y * 90.0) > 0.6)[..., None]
        albedo = _mix(albedo, oc * folds, occ)

    albedo = np.clip(albedo, 0.0, 1.0).astype(np.float32)
    albedo_bare = np.clip(albedo_bare, 0.0, 1.0).astype(np.float32) if sp["concealed"] else albedo

    # --- visible image: lit albedo ----------------------------------------------
    la, le = sp["light_az"], sp["light_el"]
    L = np.array([math.sin(la) * math.cos(le), -math.sin(le) * 0.6, math.cos(la) * math.cos(le) + 0.3])
    L = (L / np.linalg.norm(L)).astype(np.float32)
    ndl = np.clip(normal @ L, 0.0, 1.0)
    spec_ = 0.06 * ndl ** 12 * face

    def lit(alb):
        out = alb * (sp["ambient"] + sp["light_i"] * ndl)[..., None] + spec_[..., None]
        return out * (1.0 + np.asarray(sp["tint"], np.float32))

    # One noise draw shared by the visible image and its unconcealed twin (vis_target):
    # the RNG stream, and so every older output, is what it was before vis_target existed.
    vis_noise = rng.normal(0, sp["noise"], (S, S, 3)).astype(np.float32)
    vis8 = (np.clip(lit(albedo) + vis_noise, 0, 1) * 255 + 0.5).astype(np.uint8)
    vis_target8 = (np.clip(lit(albedo_bare) + vis_noise, 0, 1) * 255 + 0.5).astype(np.uint8) \
        if sp["concealed"] else vis8

    # --- THz: frontal source, geometry-dominated, blurred, fabric nearly transparent
    thz_alb = 0.62 * face + 0.45 * (hair + hair_back) * (1 - face) + 0.5 * (neck + ears) * (1 - face)
    thz_alb = np.clip(thz_alb - 0.3 * feat * face + 0.45 * glasses - 0.1 * hair * face, 0, 1.0)
    Lt = np.array([0.0, -0.35, 1.0], np.float32)
    Lt /= np.linalg.norm(Lt)
    shade_t = np.clip(normal @ Lt, 0, 1) ** 2
    base = (0.6 * shade_t + 0.4 * np.clip(depth / (lat["depth"] + 0.3), 0, 1.2)) * head_any
    thz_clean = 0.08 + 0.92 * base * (0.45 + 0.55 * thz_alb)
    speck = rng.normal(0, 1, (S, S)).astype(np.float32)
    fabric = (0.5 + 0.5 * np.sin(y * 55.0 + 6.0 * x)).astype(np.float32)

    def thz_render(occl):
        img = thz_clean * (1 - 0.1 * occl) + 0.04 * occl * fabric
        img = _blur(img, 0.9 * S / 64.0)
        img = 0.18 + 0.62 * img  # low contrast
        img = img * (1 + 0.02 * speck) + 0.006 * speck
        return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)

    def thz_dense_render(occl):
        # Dense fabric (modality thz_dense): it absorbs most of the face's signal and
        # shows its own weave, so the unconcealed target has to be inferred, not copied.
        img = thz_clean * (1 - 0.65 * occl) + occl * (0.12 + 0.14 * fabric)
        img = _blur(img, 0.9 * S / 64.0)
        img = 0.18 + 0.62 * img
        img = img * (1 + 0.02 * speck) + 0.006 * speck
        return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)

    thz_target = thz_render(np.zeros_like(occ))
    thz = thz_render(occ) if sp["concealed"] else thz_target
    thz_dense = thz_dense_render(occ) if sp["concealed"] else thz_target

    labels = {
        "identity": int(identity),
        "identity_name": w.names[identity],
        "gender": int(lat["gender"]),
        "emotion": int(emo),
        "facial_hair": int(fhair),
        "spectacles": int(sp["spectacles"]),
        "posture": int(sp["posture"]),
        "concealed": int(sp["concealed"]),
        "twin": int(w.twins[identity]),
    }
    return {"vis": vis8, "vis_target": vis_target8, "thz": thz, "thz_dense": thz_dense, "thz_target": thz_target,
            "albedo": albedo,
            "normal": normal.astype(np.float32), "depth": depth, "labels": labels, "index": int(index)}


def _sample_fields(spec: SyntheticSpec, r: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"json": r["labels"]}
    if "vis" in spec.modalities:
        out["vis.png"] = r["vis"]
    if "vis_target" in spec.modalities:
        out["vis_target.png"] = r["vis_target"]
    if "thz" in spec.modalities or "thz_dense" in spec.modalities:  # exclusive: both write thz.png
        out["thz.png"] = r["thz_dense"] if "thz_dense" in spec.modalities else r["thz"]
        out["thz_target.png"] = r["thz_target"]
    if "maps" in spec.modalities:
        out["albedo.npy"] = r["albedo"].astype(np.float16)
        out["normal.npy"] = r["normal"].astype(np.float16)
        out["depth.npy"] = r["depth"].astype(np.float16)
    if "ear" in spec.modalities:  # the json gains ear_bbox only then: other modalities' bytes never change
        out["ear.png"], box = render_ear(spec, r["labels"]["identity"], r["index"])
        out["json"] = {**r["labels"], "ear_bbox": box}
    return out


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


def sample_key(identity: int, index: int) -> str:
    return f"id{identity:05d}_s{index:04d}"


# ---------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------
def _allocate(n: int, ratios: list[float], min_each: int) -> list[int]:
    """Split n items by ratios (largest remainder), at least ``min_each`` each when possible."""
    tot = sum(ratios)
    want = [n * r / tot for r in ratios]
    got = [int(math.floor(w)) for w in want]
    for i in sorted(range(len(ratios)), key=lambda i: want[i] - got[i], reverse=True)[: n - sum(got)]:
        got[i] += 1
    if n >= min_each * len(ratios):
        for i in range(len(got)):
            while got[i] < min_each:
                j = max(range(len(got)), key=lambda j: got[j])
                got[j] -= 1
                got[i] += 1
    return got


def split_plan(spec: SyntheticSpec) -> dict[str, list[tuple[int, int]]]:
    """(identity, sample index) pairs per split, in shard order (shuffled)."""
    w = _world(spec)
    names = [n for n, _ in spec.splits]
    ratios = [r for _, r in spec.splits]
    plan: dict[str, list[tuple[int, int]]] = {n: [] for n in names}
    rng = _rng(spec.seed, 505)
    if spec.split_by == "sample":
        for i in range(spec.num_identities):
            idx = rng.permutation(spec.samples_per_identity).tolist()
            counts = _allocate(spec.samples_per_identity, ratios, 1 if min(ratios) > 0 else 0)
            pos = 0
            for name, c in zip(names, counts):
                plan[name].extend((i, k) for k in idx[pos:pos + c])
                pos += c
    else:
        units: list[list[int]] = []
        seen = set()
        for i in range(spec.num_identities):
            if i in seen:
                continue
            u = [i] if w.twins[i] < 0 else sorted([i, w.twins[i]])
            seen.update(u)
            units.append(u)
        units = [units[j] for j in rng.permutation(len(units))]
        target = [spec.num_identities * r / sum(ratios) for r in ratios]
        have = [0] * len(names)
        # make every split non-empty first (if there are enough units), then fill by deficit
        for si in range(len(names)):
            if units and ratios[si] > 0:
                u = units.pop()
                have[si] += len(u)
                plan[names[si]].extend((i, k) for i in u for k in range(spec.samples_per_identity))
        for u in units:
            si = max(range(len(names)), key=lambda s: (target[s] - have[s], -s))
            have[si] += len(u)
            plan[names[si]].extend((i, k) for i in u for k in range(spec.samples_per_identity))
    for name in names:
        items = plan[name]
        plan[name] = [items[j] for j in rng.permutation(len(items))]
    return plan


# ---------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------
class _Stats:
    """Per-channel mean/std accumulators for the manifest's image_stats."""

    def __init__(self):
        self.s: dict[str, list[np.ndarray]] = {}

    def add(self, name: str, arr: np.ndarray, scale: float = 1.0) -> None:
        a = arr.astype(np.float64) / scale
        a = a.reshape(-1, a.shape[-1]) if a.ndim == 3 else a.reshape(-1, 1)
        acc = self.s.setdefault(name, [np.zeros(a.shape[1]), np.zeros(a.shape[1]), np.zeros(1)])
        acc[0] += a.sum(0)
        acc[1] += (a ** 2).sum(0)
        acc[2] += a.shape[0]

    def result(self) -> dict[str, Any]:
        out = {}
        for k, (s, s2, n) in self.s.items():
            mean = s / n[0]
            std = np.sqrt(np.maximum(s2 / n[0] - mean ** 2, 0))
            out[k] = {"mean": [round(float(m), 5) for m in mean], "std": [round(float(x), 5) for x in std]}
        return out


def build_synthetic(out_dir: str | os.PathLike, spec: SyntheticSpec, progress: bool = False) -> Manifest:
    """Write the dataset into ``out_dir`` (which should be empty) and its manifest last."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    w = _world(spec)
    plan = split_plan(spec)
    stats = _Stats()
    train_name = spec.splits[0][0]
    splits = {}
    modalities: list[str] = []
    t0 = time.time()
    done = 0
    total = sum(len(v) for v in plan.values())
    for name, items in plan.items():
        with ShardSplitWriter(out_dir, name, maxcount=spec.maxcount) as wr:
            for ident, k in items:
                r = render_sample(spec, ident, k)
                fields = _sample_fields(spec, r)
                if not modalities:
                    modalities = sorted(fields)
                wr.write({"__key__": sample_key(ident, k), **fields})
                if name == train_name:
                    for f, val in fields.items():
                        if f.endswith(".png"):
                            stats.add(f, val, 255.0)
                        elif f.endswith(".npy"):
                            stats.add(f, val)
                done += 1
                if progress and done % 200 == 0:
                    print(f"  {done}/{total} samples ({done / (time.time() - t0):.0f}/s)", file=sys.stderr)
        splits[name] = wr.close()
    m = Manifest(
        format=FORMAT,
        created_with={"source": "synthetic", "spec": spec.to_dict(), "generator_version": GENERATOR_VERSION},
        tool_version=TOOL_VERSION,
        splits=splits,
        identities=list(w.names),
        twin_pairs=[tuple(p) for p in w.twin_pairs],
        label_schemas={k: list(v) for k, v in LABEL_SCHEMAS.items()},
        modalities=modalities,
        image_stats=stats.result(),
    )
    m.save(out_dir)
    return m


@contextlib.contextmanager
def _file_lock(path: Path):
    """Best-effort inter-process lock (flock) so concurrent callers on one host wait
    instead of building the same dataset twice; correctness never depends on it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:
            pass
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_synthetic(root: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec(),
                     progress: bool = False) -> Path:
    """Return ``root/synthetic-<hash>/``, building it first if it has no manifest.

    The data are written into a temporary sibling directory and renamed into
    place in one step, so concurrent callers and crashes never leave a half
    dataset under the final name (a leftover temporary directory of a dead
    process on this host is removed by the next call).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"synthetic-{spec_hash(spec)}"
    if (final / "manifest.json").is_file():
        return final
    with _file_lock(root / f".{final.name}.lock"):
        if (final / "manifest.json").is_file():
            return final
        sweep_stale_staging(final)
        tmp = staging_path(final)
        try:
            build_synthetic(tmp, spec, progress=progress)
            if final.exists() and not (final / "manifest.json").is_file():
                shutil.rmtree(final, ignore_errors=True)  # a broken leftover under the final name
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "manifest.json").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # someone else finished first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# ---------------------------------------------------------------------------
# preview
# ---------------------------------------------------------------------------
def _to_rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, -1)
    return a


def preview_grid(spec: SyntheticSpec, n_identities: int = 6, scale: int = 2) -> np.ndarray:
    """A picture: rows are identities (twins next to each other), columns the five
    postures, then a concealed sample, its THz and THz target, albedo, normals, depth."""
    w = _world(spec)
    rows: list[int] = []
    for a, b in w.twin_pairs[:2]:
        rows += [a, b]
    for i in range(spec.num_identities):
        if len(rows) >= n_identities:
            break
        if i not in rows:
            rows.append(i)
    S = spec.image_size
    pad = 2
    ncol = 11
    grid = np.full((len(rows) * (S + pad) + pad, ncol * (S + pad) + pad, 3), 255, np.uint8)
    for ri, ident in enumerate(rows):
        tiles = []
        by_posture: dict[int, int] = {}
        concealed_k = None
        for k in range(200):
            sp = _sample_params(spec, ident, k)
            by_posture.setdefault(sp["posture"], k)
            if concealed_k is None and sp["concealed"] and sp["posture"] == 0:
                concealed_k = k
            if len(by_posture) == 5 and concealed_k is not None:
                break
        for p in range(5):
            tiles.append(render_sample(spec, ident, by_posture.get(p, 0))["vis"])
        r = render_sample(spec, ident, concealed_k if concealed_k is not None else 0)
        tiles += [r["vis"], _to_rgb(r["thz"]), _to_rgb(r["thz_target"]),
                  (np.clip(r["albedo"], 0, 1) * 255).astype(np.uint8),
                  ((r["normal"] * 0.5 + 0.5) * 255).astype(np.uint8),
                  _to_rgb((np.clip(r["depth"] / max(float(r["depth"].max()), 1e-6), 0, 1) * 255).astype(np.uint8))]
        for ci, t in enumerate(tiles):
            y0, x0 = pad + ri * (S + pad), pad + ci * (S + pad)
            grid[y0:y0 + S, x0:x0 + S] = t
    if scale > 1:
        grid = np.repeat(np.repeat(grid, scale, 0), scale, 1)
    return grid


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shards.synthetic",
                                 description="Build the synthetic biometric shards and/or a preview picture.")
    ap.add_argument("--out", type=Path, help="root directory; the dataset goes to OUT/synthetic-<hash>/")
    ap.add_argument("--preview", type=Path, help="write a PNG grid of a few identities/postures/twins")
    ap.add_argument("--identities", type=int, default=SyntheticSpec.num_identities)
    ap.add_argument("--samples", type=int, default=SyntheticSpec.samples_per_identity)
    ap.add_argument("--size", type=int, default=SyntheticSpec.image_size)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-by", choices=["sample", "identity"], default="sample")
    ap.add_argument("--maxcount", type=int, default=SyntheticSpec.maxcount)
    args = ap.parse_args(argv)
    if args.out is None and args.preview is None:
        ap.error("give --out and/or --preview")
    spec = SyntheticSpec(num_identities=args.identities, samples_per_identity=args.samples,
                         image_size=args.size, seed=args.seed, split_by=args.split_by, maxcount=args.maxcount)
    if args.out is not None:
        t0 = time.time()
        path = ensure_synthetic(args.out, spec, progress=True)
        m = Manifest.load(path)
        sizes = ", ".join(f"{k}={m.split_size(k)}" for k in m.splits)
        print(f"{path}  ({sizes}; {time.time() - t0:.1f}s)")
    if args.preview is not None:
        from PIL import Image

        args.preview.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(preview_grid(spec)).save(args.preview)
        print(f"preview: {args.preview}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
