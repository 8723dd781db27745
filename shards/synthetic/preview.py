"""A picture of the dataset (identities by posture, twins side by side, THz and
maps) and the ``python -m shards.synthetic`` command."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ..manifest import Manifest
from .dataset import ensure_synthetic
from .faces import _sample_params
from .render import render_sample
from .spec import SyntheticSpec
from .world import _world


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
