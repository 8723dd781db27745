"""Identities: each one's latent face (geometry, colours, hair, moles), co-twins
that share it with small differences, and the seeded RNG every drawing uses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .spec import SyntheticSpec

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


# twin_style "marked": the co-twin's only differences, in face units (one face unit is
# image_size / 2 pixels: 32 px at 64 px). Each is flip-invariant or absent from the first
# twin, so a horizontal flip never turns one twin into the other (docs/differences.md).
MARK_MOLE_R = 0.06        # a dark mole of this radius (1.9 px at 64 px) on one cheek
MARK_MOLE_DX = 0.20       # its centre: this far left or right of the midline (the side drawn per pair)
MARK_MOLE_DY = 0.12       # ... and this far below the eye line (above any scarf or mask)
MARK_BROW_TH = 0.04       # both brows this much thicker (1.3 px at 64 px)
MARK_EYE_DX = 0.03        # both eyes this much further from the midline (1 px each at 64 px)
TWIN_STYLES = ("subtle", "marked")


def _twin_of(lat: dict[str, Any], rng: np.random.Generator, style: str = "subtle") -> dict[str, Any]:
    """A co-twin: the same face with small differences (``style``: :data:`TWIN_STYLES`)."""
    if style == "marked":
        return _marked_twin_of(lat, rng)
    return _subtle_twin_of(lat, rng)


def _marked_twin_of(lat: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """The first twin's face plus three marks (the constants above), nothing else: large
    enough to learn at 32-64 px, confined to small regions, so non-twins differ more."""
    t = dict(lat)
    t["brow_th"] = lat["brow_th"] + MARK_BROW_TH
    t["eye_dx"] = lat["eye_dx"] + MARK_EYE_DX
    side = float(rng.choice([-1.0, 1.0]))
    t["twin_mole"] = (side * MARK_MOLE_DX, MARK_MOLE_DY, MARK_MOLE_R)  # x, y below the eye line, radius
    return t


def _subtle_twin_of(lat: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Generator version 2's co-twin (the default): sub-pixel differences at 64 px and a
    mirrored hair parting, which a horizontal flip turns into the other twin's."""
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
    latents: tuple[dict[str, Any], ...]  # empty in the many-identities mode (base_faces > 0: many.py)
    twins: tuple[int, ...]  # co-twin index or -1
    twin_pairs: tuple[tuple[int, int], ...]
    names: tuple[str, ...]


_WORLD_CACHE: dict[SyntheticSpec, _World] = {}


def _twin_pairs(spec: SyntheticSpec, rng: np.random.Generator) -> tuple[list[tuple[int, int]], list[int]]:
    """The co-twin pairs (sorted, ``a < b``) and each identity's co-twin (-1: none)."""
    n = spec.num_identities
    n_twin = int(round(spec.twin_fraction * n)) // 2 * 2
    twin_ids = np.sort(rng.permutation(n)[:n_twin])
    order = rng.permutation(twin_ids).tolist()
    pairs = sorted(tuple(sorted((order[2 * k], order[2 * k + 1]))) for k in range(n_twin // 2))
    twins = [-1] * n
    for a, b in pairs:
        twins[a], twins[b] = b, a
    return pairs, twins


def _names(n: int) -> tuple[str, ...]:
    return tuple(f"syn{i:05d}" for i in range(n))


def _world(spec: SyntheticSpec) -> _World:
    if spec in _WORLD_CACHE:
        return _WORLD_CACHE[spec]
    n = spec.num_identities
    rng = _rng(spec.seed, 101)
    pairs, twins = _twin_pairs(spec, rng)
    if spec.base_faces:  # no latent faces per identity: they come from the base faces (many.py)
        w = _World(latents=(), twins=tuple(twins), twin_pairs=tuple(pairs), names=_names(n))
        _WORLD_CACHE[spec] = w
        return w
    genders = rng.integers(0, 2, size=n)
    latents: list[dict[str, Any] | None] = [None] * n
    for i in range(n):
        if latents[i] is not None:
            continue
        lat = _draw_identity(_rng(spec.seed, 202, i), int(genders[i]))
        latents[i] = lat
        if twins[i] >= 0:
            latents[twins[i]] = _twin_of(lat, _rng(spec.seed, 303, i), spec.twin_style)
    w = _World(latents=tuple(latents), twins=tuple(twins), twin_pairs=tuple(pairs),
               names=_names(n))
    _WORLD_CACHE[spec] = w
    return w
