"""Writing the dataset: which samples go to which split, the shards and the
manifest (:func:`build_synthetic`), built once per spec under a hashed name
(:func:`ensure_synthetic`)."""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import staging_path, sweep_stale_staging
from ..manifest import FORMAT, TOOL_VERSION, Manifest
from ..writer import ShardSplitWriter
from .ears import render_ear
from .render import render_sample
from .spec import GENERATOR_VERSION, LABEL_SCHEMAS, SyntheticSpec, spec_hash
from .world import _rng, _world


def sample_key(identity: int, index: int) -> str:
    return f"id{identity:05d}_s{index:04d}"


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
    instead of building the same dataset twice; correctness never depends on it.

    The lock file is removed when the lock is released, so none is left behind.
    That is safe because a holder removes it while still holding the lock, and a
    waiter that then gets the lock checks that ``path`` still names the file it
    locked; if not (removed, or made anew by a third process) it locks again."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:  # a file system without flock: go on unlocked (see above)
            f.close()
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            return
        try:
            named, held = os.stat(path), os.fstat(f.fileno())
            current = (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
        except FileNotFoundError:
            current = False
        if current:
            break
        f.close()  # the lock of a removed file excludes no one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        f.close()  # releases the lock


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
