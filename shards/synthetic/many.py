"""Many identities cheaply (``SyntheticSpec.base_faces = B > 0``): a dataset of 10^5
identities for the identity-head benchmarks (Partial FC): 10^5 x 2 images at
32 px are drawn and packed in about 90 s of one core (``biomtl shards create
--format synthetic --base-faces 256 --workers 1``, see shards/sources/synthetic.py).

Which way, and why: drawing a face with :mod:`shards.synthetic.faces` costs about
1.6 ms at 32 px, so 10^5 identities x 2 images would take ~6 minutes of one core
for the drawing alone (and more to pack). This mode draws only ``B x BASE_POSES``
faces, lazily and once per process: ``B`` base faces (different people, the
normal renderer's identities), each in ``BASE_POSES`` captures (pose, expression,
lighting, concealment as the normal renderer varies them). Every identity is one
capture of one base face under its own cheap transform, drawn from ``(seed,
identity)``:

* a per-channel colour gain and offset (skin, hair and background colour shift),
* an image offset of up to ``S // 16`` pixels,
* a smooth colour pattern: a ``PATTERN_GRID`` x ``PATTERN_GRID`` grid of random
  colours interpolated to the image (a blotch map no other identity shares).

Image ``k`` of an identity is that capture under the identity's transform plus a
per-image jitter (one pixel of offset, brightness, pixel noise): a few NumPy
operations on the small image, under a third of what encoding and writing it cost. So an identity's images differ by the jitter
only, and two identities on the same base face by their transforms (what a model
must learn to tell them apart). With B = 8 and 24 px, the mean pixel L2 between
two images of one identity is ~0.45 of that between identities sharing a base
face (~0.4 of any two identities), and the nearest image in pixels is of the same
identity for ~3 in 4 identities. Co-twins share the base face, capture, colour
transform and offset; their patterns differ by a smaller random grid
(``TWIN_PATTERN``).

Labels: ``identity``/``identity_name``/``twin`` of this dataset; gender and
facial_hair of the base face, emotion, spectacles, posture and concealed of the
capture, so every recipe reading them still trains. Only the visible image
(``vis``) is drawn. An identity's look depends on the seed, its number, B and
the image size only (not on the number of identities or images per identity).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from .faces import render_face
from .spec import SyntheticSpec
from .world import _rng, _world

BASE_POSES = 4  # captures drawn of each base face; an identity is one of them
PATTERN_GRID = 4  # nodes per side of an identity's colour pattern
PATTERN = 0.08  # standard deviation of the pattern's colours (image values in [0, 1])
TWIN_PATTERN = 0.03  # co-twins: standard deviation of the difference of their patterns
GAIN = (0.75, 1.25)  # per-channel colour gain range
OFFSET = 0.05  # standard deviation of the per-channel colour offset
JITTER_BRIGHTNESS = 0.06  # per image: brightness factor in 1 +- this
NOISE = 0.02  # per image: pixel noise standard deviation
NOISE_FIELDS = 64  # per image: one of this many noise images (drawn once per process)
CHUNK = 1024  # identities whose looks are drawn together


@lru_cache(maxsize=8)
def _base_spec(spec: SyntheticSpec) -> SyntheticSpec:
    """The ordinary dataset the base faces are drawn from: B faces (no twins among
    them, so all are different people), BASE_POSES captures each, the same size and seed."""
    return SyntheticSpec(num_identities=spec.base_faces, samples_per_identity=BASE_POSES, twin_fraction=0.0,
                         image_size=spec.image_size, modalities=("vis",), seed=spec.seed)


def _margin(size: int) -> int:
    """The largest offset (identity's + image's) in pixels."""
    return max(1, size // 16) + 1


@lru_cache(maxsize=None)
def _base(base: SyntheticSpec, face: int, pose: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Base face ``face`` in capture ``pose``: the image edge-padded by the largest
    offset (so an offset is a slice) and its labels. Cached: drawn once per process."""
    r = render_face(base, face, pose)
    m = _margin(base.image_size)
    return np.pad(r["vis"], ((m, m), (m, m), (0, 0)), mode="edge"), r["labels"]


@lru_cache(maxsize=8)
def _upsampler(size: int) -> np.ndarray:
    """(size, PATTERN_GRID) linear interpolation from the grid nodes (at the image's
    corners and evenly between) to the pixel centres."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * (PATTERN_GRID - 1)
    lo = np.minimum(t.astype(int), PATTERN_GRID - 2)
    w = t - lo
    u = np.zeros((size, PATTERN_GRID), np.float32)
    u[np.arange(size), lo] = 1.0 - w
    u[np.arange(size), lo + 1] = w
    return u


@lru_cache(maxsize=None)
def _chunk(spec: SyntheticSpec, chunk: int) -> dict[str, np.ndarray]:
    """The looks of identities ``chunk * CHUNK ...`` and the jitter of their images,
    drawn together (one generator per chunk: a generator per image costs more
    than the image). An identity's look depends on the seed, its number, B and
    the image size only, not on how many identities there are. All chunks stay
    cached: about 250 bytes per identity."""
    rng = _rng(spec.seed, 606, chunk)
    n, k, m = CHUNK, spec.samples_per_identity, _margin(spec.image_size) - 1
    return {"face": rng.integers(spec.base_faces, size=n).astype(np.int32),
            "capture": rng.integers(BASE_POSES, size=n).astype(np.int8),
            "gain": rng.uniform(*GAIN, size=(n, 3)).astype(np.float32),
            "offset": rng.normal(0.0, OFFSET, size=(n, 3)).astype(np.float32),
            "shift": rng.integers(-m, m + 1, size=(n, 2)).astype(np.int8),
            "grid": rng.normal(0.0, PATTERN, size=(n, PATTERN_GRID, PATTERN_GRID, 3)).astype(np.float32),
            "jitter": rng.integers(-1, 2, size=(n, k, 2)).astype(np.int8),
            "brightness": (1.0 + rng.uniform(-JITTER_BRIGHTNESS, JITTER_BRIGHTNESS, size=(n, k))).astype(np.float32),
            "noise": rng.integers(NOISE_FIELDS, size=(n, k)).astype(np.int16)}


@lru_cache(maxsize=8)
def _noise_bank(seed: int, size: int) -> np.ndarray:
    """NOISE_FIELDS pixel-noise images; each image adds one of them."""
    return (_rng(seed, 609).standard_normal((NOISE_FIELDS, size, size, 3), dtype=np.float32) * np.float32(NOISE))


def identity_look(spec: SyntheticSpec, identity: int) -> dict[str, Any]:
    """The identity's base face (``face``) and its ``capture``, colour ``gain`` and ``offset``, image
    ``shift`` (rows, columns) and pattern ``grid``. Co-twins share the first's
    look; the second's pattern differs by its own small grid (TWIN_PATTERN)."""
    twin = _world(spec).twins[identity]
    first = identity if twin < 0 else min(identity, twin)
    c, j = divmod(first, CHUNK)
    arrays = _chunk(spec, c)
    look = {name: arrays[name][j] for name in ("face", "capture", "gain", "offset", "shift", "grid")}
    if twin >= 0 and identity != first:
        look["grid"] = look["grid"] + _rng(spec.seed, 607, identity).normal(
            0.0, TWIN_PATTERN, size=look["grid"].shape).astype(np.float32)
    return look


def render_many(spec: SyntheticSpec, identity: int, index: int) -> dict[str, Any]:
    """Image ``index`` of ``identity`` in the many-identities mode: ``vis`` (SxSx3
    uint8), ``labels`` (the json label dict) and ``index``, like
    :func:`shards.synthetic.render_sample` without the other modalities."""
    S, G = spec.image_size, PATTERN_GRID
    look = identity_look(spec, identity)
    padded, base_labels = _base(_base_spec(spec), int(look["face"]), int(look["capture"]))
    c, j = divmod(identity, CHUNK)
    own = _chunk(spec, c)
    m = _margin(S)
    dy, dx = (look["shift"] + own["jitter"][j, index]).tolist()
    img = padded[m + dy:m + dy + S, m + dx:m + dx + S].astype(np.float32) * np.float32(1 / 255)
    u = _upsampler(S)
    # pattern[a, b] = sum_g,h u[a, g] grid[g, h] u[b, h]: two products (einsum's planning costs more)
    pattern = u @ (u @ look["grid"].reshape(G, -1)).reshape(S, G, 3)
    img = (img * look["gain"] + look["offset"] + pattern) * own["brightness"][j, index]
    img += _noise_bank(spec.seed, S)[own["noise"][j, index]]
    vis = (np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    w = _world(spec)
    labels = {**base_labels, "identity": int(identity), "identity_name": w.names[identity],
              "twin": int(w.twins[identity])}
    return {"vis": vis, "labels": labels, "index": int(index)}
