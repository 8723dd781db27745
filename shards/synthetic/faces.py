"""Faces (modalities ``vis``, ``vis_target``, ``maps``): one sample's pose, head
masks, height field (-> depth and normals: the photometric maps), albedo with
its features (eyes, brows, mouth, facial hair, spectacles, concealment) and
the lit visible image; the THz images of the same capture come from
:mod:`shards.synthetic.thz`.

The layers draw in a fixed order from one RNG stream per sample
(``sp["rng_seed"]``): background noise, facial-hair texture, the visible
image's noise, then the THz speckle. Keep that order: it is what makes the
same spec give the same bytes."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .draw import _blur, _ellipse_d, _gauss, _inside, _mix
from .spec import SyntheticSpec
from .thz import render_thz
from .world import _HAIR, _IRIS, _SKIN_DARK, _SKIN_LIGHT, _rng, _world

# yaw (deg, + turns the face to image-right) and pitch (deg, + looks up) per posture
_POSTURE_ANGLES = {0: (0.0, 0.0), 1: (-28.0, 0.0), 2: (28.0, 0.0), 3: (0.0, 22.0), 4: (0.0, -22.0)}


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


@dataclass
class _Face:
    """One sample being drawn: its identity latents ``lat`` and sample parameters
    ``sp``, the pixel grid in the face frame (``x``, ``y``; ``v``: image rows in
    [-1, 1]), the pose's sines/cosines, the head masks and the feature anchors."""

    lat: dict[str, Any]
    sp: dict[str, Any]
    S: int
    px: float
    aa: float
    v: np.ndarray
    x: np.ndarray
    y: np.ndarray
    trig: tuple[float, float, float, float]   # sin/cos of yaw, sin/cos of pitch
    face: np.ndarray = None
    hair: np.ndarray = None
    hair_back: np.ndarray = None
    ears: np.ndarray = None
    neck: np.ndarray = None
    neck_w: np.ndarray = None
    head_any: np.ndarray = None

    @property
    def emo(self) -> int:
        return self.sp["emotion"]

    @property
    def tip_y(self) -> float:
        return self.lat["eye_y"] + self.lat["nose_len"]

    @property
    def my(self) -> float:
        return self.tip_y + self.lat["mouth_dy"]


def _posed_face(spec: SyntheticSpec, lat: dict[str, Any], sp: dict[str, Any]) -> _Face:
    """Image grid -> head frame (similarity jitter) -> face frame (3D pose, traced on the height field)."""
    S = spec.image_size
    px = 2.0 / S  # one pixel in face units
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
    return _Face(lat=lat, sp=sp, S=S, px=px, aa=1.2 * px, v=v, x=x, y=y, trig=(sa, ca, sb, cb))


def _head_masks(f: _Face) -> None:
    lat, x, y, aa = f.lat, f.x, f.y, f.aa
    fw, fh, ey = lat["fw"], lat["fh"], lat["eye_y"]
    f.face = _inside((_face_radius(lat, x, y) - 1.0) * fw, aa)
    f.hair, f.hair_back = _hair_mask(lat, x, y, aa)
    ears = np.zeros_like(x)
    for s in (-1.0, 1.0):
        ears = np.maximum(ears, _inside(_ellipse_d(x, y, s * fw * 0.98, ey + 0.09, lat["ear_r"] * 0.55,
                                                   lat["ear_r"]), aa))
    f.ears = ears
    f.neck_w = lat["neck_w"] + 0.25 * np.clip(y - 0.8, 0, None) ** 2 * 8  # flares into the shoulders
    f.neck = _inside(np.abs(x) - f.neck_w, aa) * _inside(fh * 0.4 - y, aa)
    f.head_any = np.maximum.reduce([f.face, f.hair, f.hair_back, f.ears, f.neck])


def _depth_and_normals(f: _Face) -> tuple[np.ndarray, np.ndarray]:
    """Height in the face frame, then image-space depth and its unit normals."""
    lat, x, y = f.lat, f.x, f.y
    sa, ca, sb, cb = f.trig
    fw = lat["fw"]
    h_face = _geometry_height(lat, x, y) + _detail_height(lat, x, y, f.emo) * f.face
    h_face = h_face + lat["hair_vol"] * 0.6 * f.hair
    h_neck = 0.22 * np.sqrt(np.clip(1 - (x / (f.neck_w + 0.05)) ** 2, 0, 1))
    h_back = 0.12 * np.sqrt(np.clip(1 - (x / (fw * 1.3 + lat["hair_vol"])) ** 2, 0, 1))
    skull_in = np.maximum(f.face, f.hair)
    h = h_face * skull_in + (1 - skull_in) * np.maximum(h_neck * f.neck, h_back * f.hair_back)
    z1 = -x * sa + h * ca
    inside = f.head_any > 0.01
    depth = y * sb + z1 * cb
    if inside.any():
        depth = depth - depth[inside].min()
    depth = np.where(inside, depth + 0.02, 0.0).astype(np.float32) * np.clip(f.head_any * 1.5, 0, 1)
    depth = _blur(depth, 0.5)
    gy, gx = np.gradient(depth, f.px)
    gx, gy = np.clip(gx, -1.8, 1.8), np.clip(gy, -1.8, 1.8)  # soft silhouettes
    normal = np.stack([-gx, -gy, np.ones_like(gx)], -1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    return depth, normal


def _skin_colour(lat: dict[str, Any]) -> np.ndarray:
    skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * lat["skin_t"]
    return np.clip(skin * (1 + np.array([lat["skin_hue"], 0, -lat["skin_hue"]], np.float32)), 0, 1)


def _base_albedo(f: _Face, skin: np.ndarray, strands: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Background, hair behind the head, neck, ears and the shaded skin of the face."""
    lat, sp, S, x, y = f.lat, f.sp, f.S, f.x, f.y
    fw, ey, edx = lat["fw"], lat["eye_y"], lat["eye_dx"]
    bgc = np.asarray(sp["bg"], np.float32)
    albedo = np.broadcast_to(bgc, (S, S, 3)) * (1.0 - 0.25 * (f.v[..., None] + 1) / 2)
    albedo = (albedo + rng.normal(0, 0.01, (S, S, 1))).astype(np.float32)  # owned: _mix works in place
    albedo = _mix(albedo, _HAIR[lat["hair"]] * 0.8 * strands, f.hair_back)
    albedo = _mix(albedo, skin * 0.88, f.neck)
    albedo = _mix(albedo, skin * 0.95, f.ears)
    skin_map = np.broadcast_to(skin, (S, S, 3)).copy()
    # cheeks and eye-socket shading on the skin itself
    for s in (-1.0, 1.0):
        skin_map = _mix(skin_map, skin * np.array([1.05, 0.85, 0.85], np.float32),
                        0.25 * (1 - lat["gender"] * 0.7) * _gauss(x, y, s * fw * 0.55, ey + 0.2, 0.1, 0.08))
        skin_map = _mix(skin_map, skin * 0.8, 0.35 * _gauss(x, y, s * edx, ey - 0.01, lat["eye_rw"] * 1.5,
                                                             lat["eye_rw"] * 1.0))
    return _mix(albedo, skin_map, f.face)


def _draw_eyes_brows_nostrils(f: _Face, albedo: np.ndarray, feat: np.ndarray, skin: np.ndarray
                              ) -> tuple[np.ndarray, np.ndarray]:
    lat, sp, x, y, aa, face, emo = f.lat, f.sp, f.x, f.y, f.aa, f.face, f.emo
    ey, edx = lat["eye_y"], lat["eye_dx"]
    hair_c = _HAIR[lat["hair"]]
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
        nos = _inside(_ellipse_d(x, y, s * lat["nose_w"] * 0.5, f.tip_y + 0.018, 0.018, 0.009), aa) * face
        albedo = _mix(albedo, skin * 0.3, 0.8 * nos)
    return albedo, feat


def _mouth_shape(f: _Face) -> dict[str, Any]:
    """Width, centre line and lip thicknesses of the mouth for the sample's emotion."""
    lat, emo = f.lat, f.emo
    mw = lat["mouth_w"] * (1.12 if emo == 1 else 1.0) * (0.8 if emo == 4 else 1.0)
    tx = f.x / mw
    curv = {0: 0.005, 1: 0.05, 2: -0.045, 3: -0.015, 4: 0.0}[emo]
    return {"mw": mw, "tx": tx, "inside_t": _inside(np.abs(tx) - 1.0, f.aa / mw),
            "yc": f.my - curv * tx ** 2 + curv * 0.5,  # corners up for curv > 0 (image y points down)
            "wt": np.sqrt(np.clip(1 - tx ** 2, 0, 1)),
            "lip_up": lat["lip_th"] * (0.8 if emo == 3 else 1.0),
            "lip_lo": lat["lip_th"] * 1.25 * (0.8 if emo == 3 else 1.0)}


def _draw_mouth(f: _Face, albedo: np.ndarray, skin: np.ndarray, m: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    lat, x, y, aa, face, emo, my = f.lat, f.x, f.y, f.aa, f.face, f.emo, f.my
    mw, inside_t, yc, wt = m["mw"], m["inside_t"], m["yc"], m["wt"]
    lips_c = skin * 0.72 + np.array([0.55, 0.12, 0.15], np.float32) * (0.28 + 0.12 * (1 - lat["gender"]))
    if emo == 4:  # surprised: open "O"
        outer = _inside(_ellipse_d(x, y, 0, my + 0.012, mw * 0.62, 0.055), aa) * face
        inner = _inside(_ellipse_d(x, y, 0, my + 0.012, mw * 0.45, 0.035), aa) * face
        albedo = _mix(albedo, lips_c, outer)
        albedo = _mix(albedo, np.array([0.12, 0.03, 0.04], np.float32), inner)
        return albedo, outer
    lips = inside_t * _inside(y - (yc + m["lip_lo"] * wt), aa) * _inside((yc - m["lip_up"] * wt) - y, aa) * face
    albedo = _mix(albedo, lips_c, lips)
    gap = 0.004 + (0.012 * wt if emo == 1 else 0.0)
    line = inside_t * _inside(np.abs(y - yc - gap / 2) - gap / 2, aa * 0.7) * face
    if emo == 1:  # smile shows teeth
        albedo = _mix(albedo, np.array([0.9, 0.88, 0.82], np.float32), line * (wt > 0.2))
        albedo = _mix(albedo, np.array([0.25, 0.05, 0.05], np.float32),
                      inside_t * _inside(np.abs(y - yc - gap) - 0.002, aa * 0.5) * face)
    else:
        albedo = _mix(albedo, np.array([0.2, 0.05, 0.06], np.float32), 0.9 * line)
    return albedo, lips


def _draw_facial_hair(f: _Face, albedo: np.ndarray, feat: np.ndarray, m: dict[str, Any], mouth: np.ndarray,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A moustache (``facial_hair`` 1) or a beard (2); draws the texture from ``rng``."""
    lat, S, x, y, aa, face, emo = f.lat, f.S, f.x, f.y, f.aa, f.face, f.emo
    fw, ey, my, mw = lat["fw"], lat["eye_y"], f.my, m["mw"]
    tex = (0.75 + 0.25 * rng.random((S, S))).astype(np.float32)
    tm = x / (mw * 1.3)
    mous = (_inside(np.abs(tm) - 1.0, aa / mw) * _inside(y - (my - 0.6 * m["lip_up"] + 0.05 * tm ** 2), aa)
            * _inside((f.tip_y + 0.028 + 0.03 * tm ** 2) - y, aa) * face)
    cover = mous
    if lat["facial_hair"] == 2:
        jaw = _inside((my - 0.03 + 0.25 * (np.abs(x) / fw) ** 1.5 * -1.0) - y, -aa) * face
        jaw = jaw * (1 - _inside(_ellipse_d(x, y, 0, my + 0.01, mw * 1.05, m["lip_lo"] + 0.012), aa))
        side = _inside(np.abs(x) - fw * 0.72, -aa) * (y > ey + 0.05) * face
        cover = np.maximum(cover, np.maximum(jaw, side))
        if emo == 4:
            cover = cover * (1 - mouth)
    albedo = _mix(albedo, _HAIR[lat["hair"]] * 0.6 * tex[..., None], 0.85 * cover)
    return albedo, np.maximum(feat, cover * 0.5)


def _draw_spectacles(f: _Face, albedo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frames and lenses when the sample wears spectacles; returns the frame mask too."""
    lat, S, x, y, aa = f.lat, f.S, f.x, f.y, f.aa
    fw, ey, edx = lat["fw"], lat["eye_y"], lat["eye_dx"]
    glasses = np.zeros((S, S), np.float32)
    if not f.sp["spectacles"]:
        return albedo, glasses
    fr = np.asarray(f.sp["frame"], np.float32)
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
    glasses = glasses * np.maximum(f.face, f.hair * 0.0 + (np.abs(x) < fw * 1.05))
    albedo = albedo * (1 - 0.12 * lens[..., None])
    return _mix(albedo, fr, glasses), glasses


def _conceal(f: _Face, albedo: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A scarf or a mask over the lower face when the sample is concealed:
    ``(albedo, albedo without it, its mask)``, both albedos clipped to [0, 1]."""
    lat, sp, S, x, y, aa = f.lat, f.sp, f.S, f.x, f.y, f.aa
    fw, fh = lat["fw"], lat["fh"]
    occ = np.zeros((S, S), np.float32)
    albedo_bare = albedo.copy() if sp["concealed"] else albedo  # _mix below works in place
    if sp["concealed"]:
        top = f.tip_y - 0.02 + sp["occ_top"] + 0.05 * (x / fw) ** 2
        width = fw * (1.08 if sp["occ_kind"] == 0 else 1.0)
        occ = _inside(top - y, aa) * _inside(np.abs(x) - width - 0.1 * np.clip(y - fh * 0.6, 0, None), aa)
        occ = occ * np.maximum(f.face, np.maximum(f.neck, (y > fh * 0.3) * _inside(np.abs(x) - width, aa)))
        oc = np.asarray(sp["occ_color"], np.float32)
        if sp["occ_kind"] == 0:  # scarf: folds
            folds = 1.0 + 0.15 * np.sin(y * 55.0 + 6.0 * x)[..., None]
        else:  # mask: pleats
            folds = 1.0 - 0.12 * (np.sin(y * 90.0) > 0.6)[..., None]
        albedo = _mix(albedo, oc * folds, occ)
    albedo = np.clip(albedo, 0.0, 1.0).astype(np.float32)
    albedo_bare = np.clip(albedo_bare, 0.0, 1.0).astype(np.float32) if sp["concealed"] else albedo
    return albedo, albedo_bare, occ


def _visible(f: _Face, albedo: np.ndarray, albedo_bare: np.ndarray, normal: np.ndarray,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The lit albedo as 8-bit images: the capture and its unconcealed twin (``vis_target``)."""
    sp, S = f.sp, f.S
    la, le = sp["light_az"], sp["light_el"]
    L = np.array([math.sin(la) * math.cos(le), -math.sin(le) * 0.6, math.cos(la) * math.cos(le) + 0.3])
    L = (L / np.linalg.norm(L)).astype(np.float32)
    ndl = np.clip(normal @ L, 0.0, 1.0)
    spec_ = 0.06 * ndl ** 12 * f.face

    def lit(alb):
        out = alb * (sp["ambient"] + sp["light_i"] * ndl)[..., None] + spec_[..., None]
        return out * (1.0 + np.asarray(sp["tint"], np.float32))

    # One noise draw shared by the visible image and its unconcealed twin (vis_target):
    # the RNG stream, and so every older output, is what it was before vis_target existed.
    vis_noise = rng.normal(0, sp["noise"], (S, S, 3)).astype(np.float32)
    vis8 = (np.clip(lit(albedo) + vis_noise, 0, 1) * 255 + 0.5).astype(np.uint8)
    vis_target8 = (np.clip(lit(albedo_bare) + vis_noise, 0, 1) * 255 + 0.5).astype(np.uint8) \
        if sp["concealed"] else vis8
    return vis8, vis_target8


def canonical_params(spec: SyntheticSpec, identity: int) -> dict[str, Any]:
    """Sample parameters of a studio capture: frontal, neutral, bare, no spectacles, light
    from the front, no sensor noise, one fixed RNG seed (the same for every identity). Two
    identities' canonical captures differ only where their latent faces do: how the co-twin
    differences are measured (tests/shards/test_synthetic_twins.py, docs/differences.md)."""
    sp = _sample_params(spec, identity, 0)
    sp.update(posture=0, emotion=0, concealed=0, spectacles=0, yaw=0.0, pitch=0.0, roll=0.0, scale=1.0,
              shift=[0.0, 0.0], light_az=0.0, light_el=0.6, light_i=0.9, ambient=0.3,
              tint=np.zeros(3, np.float32), bg=np.full(3, 0.5, np.float32), noise=0.0, gaze=[0.0, 0.0],
              rng_seed=0)
    return sp


def render_face(spec: SyntheticSpec, identity: int, index: int, params: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """Draw sample ``index`` of ``identity`` (``spec.base_faces == 0``; any mode:
    :func:`shards.synthetic.render_sample`): a dict with ``vis``/``vis_target`` (HxWx3
    uint8; ``vis_target`` without the concealment), ``thz``/``thz_dense``/``thz_target``
    (HxW uint8; thin fabric, dense fabric, unconcealed), ``albedo``/``normal`` (HxWx3 float32),
    ``depth`` (HxW float32) and ``labels`` (the json label dict). ``params``: these sample
    parameters instead of the drawn ones (:func:`canonical_params`)."""
    w = _world(spec)
    lat = w.latents[identity]
    sp = _sample_params(spec, identity, index) if params is None else params
    rng = _rng(sp["rng_seed"])
    f = _posed_face(spec, lat, sp)
    _head_masks(f)
    depth, normal = _depth_and_normals(f)

    skin = _skin_colour(lat)
    strands = 1.0 + 0.07 * np.sin((f.x * 45.0 + 5.0 * np.sin(f.y * 7.0)) + lat["part"] * 5)[..., None]
    albedo = _base_albedo(f, skin, strands, rng)
    feat = np.zeros((f.S, f.S), np.float32)  # where facial features are (for THz albedo)
    albedo, feat = _draw_eyes_brows_nostrils(f, albedo, feat, skin)
    m = _mouth_shape(f)
    albedo, mouth = _draw_mouth(f, albedo, skin, m)
    feat = np.maximum(feat, mouth)
    if lat["mole"] is not None:
        mx, myy, mr = lat["mole"]
        albedo = _mix(albedo, skin * 0.35, _inside(_ellipse_d(f.x, f.y, mx * lat["fw"], myy, mr, mr), f.aa) * f.face)
    if lat["facial_hair"]:
        albedo, feat = _draw_facial_hair(f, albedo, feat, m, mouth, rng)
    if lat.get("twin_mole") is not None:  # twin_style "marked": the co-twin's cheek mark (over any beard)
        mx, mdy, mr = lat["twin_mole"]
        spot = _inside(_ellipse_d(f.x, f.y, mx, lat["eye_y"] + mdy, mr, mr), f.aa) * f.face
        # a dark mole on light skin, a pale mark on dark skin or beard: >= 0.3 from what it covers
        under = albedo[spot > 0.5].mean(0) if (spot > 0.5).any() else skin
        mark = under * 0.3 if float(under.mean()) > 0.45 else np.clip(under + 0.4, 0, 1).astype(np.float32)
        albedo = _mix(albedo, mark, spot)
    albedo = _mix(albedo, _HAIR[lat["hair"]] * strands, f.hair)  # hair in front of the face
    albedo, glasses = _draw_spectacles(f, albedo)
    albedo, albedo_bare, occ = _conceal(f, albedo)

    vis8, vis_target8 = _visible(f, albedo, albedo_bare, normal, rng)
    thz, thz_dense, thz_target = render_thz(f, depth, normal, feat, glasses, occ, rng)
    labels = {
        "identity": int(identity),
        "identity_name": w.names[identity],
        "gender": int(lat["gender"]),
        "emotion": int(f.emo),
        "facial_hair": int(lat["facial_hair"]),
        "spectacles": int(sp["spectacles"]),
        "posture": int(sp["posture"]),
        "concealed": int(sp["concealed"]),
        "twin": int(w.twins[identity]),
    }
    return {"vis": vis8, "vis_target": vis_target8, "thz": thz, "thz_dense": thz_dense, "thz_target": thz_target,
            "albedo": albedo,
            "normal": normal.astype(np.float32), "depth": depth, "labels": labels, "index": int(index)}
