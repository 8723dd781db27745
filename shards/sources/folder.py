"""``folder``: one directory per identity (the DCAL twin layout; also ORL faces).

::

    ROOT/<identity>/*.{jpg,jpeg,png,pgm,gif,bmp}      (case-insensitive suffixes)
    --twins twin_pairs.json   [["id_a", "id_b"], ...]   (optional)
    --pairs test_pairs.json   [{"img1": ..., "img2": ..., "label": 0|1}, ...]   (optional)

``../shared/data/orl_faces`` is this layout: ``s1/1.pgm`` .. ``s40/10.pgm``
(binary PGM, stored as-is under ``image.pgm``).

* Keys: ``<identity>_<file stem>`` (sanitised, deduplicated), e.g. ``s1_10``.
* Fields: ``image.<ext>`` (original bytes when every image has the same
  format, else lossless PNG) and ``json`` (``identity``, ``identity_name``,
  ``twin``: co-twin identity index or -1, ``path``: the file relative to ROOT).
* Folders starting with ``.`` or ``_``, nested folders, non-image files and
  images directly in ROOT are ignored and listed in the report.
* Twins: each identity has at most one co-twin; a pair naming an unknown
  identity, or an identity already paired, is a fault ("bad twin pair").
* Pairs: ``img1``/``img2`` may be paths relative to ROOT (``id/file.jpg``),
  absolute paths, ``<identity>/<file>`` or a bare file name when it is unique.
  Unresolvable entries are faults ("bad pair"). The samples the pairs use are
  put into the ``--pairs-split`` split (default ``test``; with
  ``--split-by identity`` their whole identities, twins included), and the
  pairs go into the manifest (``pairs``: key1, key2, label, split) and into
  ``DIR/<split>_pairs.json`` for the DCAL evaluator.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from . import (IMAGE_SUFFIXES, Fault, InputError, Item, KeyMaker, Scan, Source, choose_image_ext,
               natural_key, open_regular, read_image, require_dir, require_file)


class FolderLoader:
    def __init__(self, ext: str):
        self.ext = ext

    def __call__(self, item: Item) -> dict[str, Any]:
        f, _ = read_image(item.payload["path"], self.ext)
        return {f"image.{self.ext}": f}


def read_twins(path: Path, identities: set[str], faults: list[Fault]) -> list[tuple[str, str]]:
    try:
        with open_regular(path, "r", encoding="utf-8") as f:
            data = json.loads(f.read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"--twins {path}: not readable JSON ({type(e).__name__}: {e})") from None
    if isinstance(data, dict) and "twin_pairs" in data:
        data = data["twin_pairs"]
    if not isinstance(data, list):
        raise InputError(f"--twins {path}: expected a list of [id_a, id_b] pairs")
    out: list[tuple[str, str]] = []
    paired: set[str] = set()
    for i, p in enumerate(data):
        where = f"{path.name}[{i}]"
        if not (isinstance(p, (list, tuple)) and len(p) == 2):
            faults.append(Fault("bad twin pair", where, f"expected [id_a, id_b], got {p!r}"))
            continue
        a, b = str(p[0]), str(p[1])
        unknown = [x for x in (a, b) if x not in identities]
        if unknown:
            faults.append(Fault("bad twin pair", where, f"unknown identity {', '.join(unknown)}"))
        elif a == b:
            faults.append(Fault("bad twin pair", where, f"{a} paired with itself"))
        elif a in paired or b in paired:
            faults.append(Fault("bad twin pair", where, f"{a if a in paired else b} is already in a twin pair"))
        else:
            paired.update((a, b))
            out.append((a, b) if natural_key(a) <= natural_key(b) else (b, a))
    return out


def resolve_pairs(path: Path, root: Path, lookup: dict[str, str], faults: list[Fault]) -> list[tuple[str, str, int]]:
    """``[{"img1","img2","label"}]`` -> (key1, key2, label); ``lookup`` maps names to keys."""
    try:
        with open_regular(path, "r", encoding="utf-8") as f:
            data = json.loads(f.read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"--pairs {path}: not readable JSON ({type(e).__name__}: {e})") from None
    if isinstance(data, dict) and "pairs" in data:
        data = data["pairs"]
    if not isinstance(data, list):
        raise InputError(f"--pairs {path}: expected a list of {{img1, img2, label}}")

    def find(name: Any) -> str | None:
        s = str(name).replace("\\", "/")
        for cand in (s, s.lstrip("./"), os.path.basename(s)):
            if cand in lookup:
                return lookup[cand]
        p = Path(s)
        if p.is_absolute():
            try:
                return lookup.get(p.resolve().relative_to(root.resolve()).as_posix())
            except ValueError:
                return None
        return None

    out = []
    for i, r in enumerate(data):
        where = f"{path.name}[{i}]"
        if not isinstance(r, dict) or not {"img1", "img2", "label"} <= set(r):
            faults.append(Fault("bad pair", where, f"expected {{img1, img2, label}}, got {r!r}"[:200]))
            continue
        try:
            label = int(r["label"])
        except (TypeError, ValueError):
            label = -1
        if label not in (0, 1):
            faults.append(Fault("bad pair", where, f"label must be 0 or 1, got {r['label']!r}"))
            continue
        k1, k2 = find(r["img1"]), find(r["img2"])
        if k1 is None or k2 is None:
            faults.append(Fault("bad pair", where, f"image not found: {r['img1'] if k1 is None else r['img2']}"))
            continue
        out.append((k1, k2, label))
    return out


class FolderSource(Source):
    name = "folder"
    help = "ROOT/<identity>/*.{jpg,png,pgm,...} [--twins twin_pairs.json] [--pairs test_pairs.json]"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("folder options")
        g.add_argument("--twins", type=Path, help="folder: JSON list of [identity_a, identity_b] twin pairs")
        g.add_argument("--pairs", type=Path, help="folder: JSON list of {img1, img2, label} evaluation pairs")

    def scan(self, input_path: Path | None, args: argparse.Namespace) -> Scan:
        root = require_dir(input_path)
        scan = Scan(items=[])
        keys = KeyMaker()
        lookup: dict[str, str] = {}
        basenames: dict[str, list[str]] = {}
        paths: list[Path] = []
        ident_dirs = []
        for entry in sorted(os.scandir(root), key=lambda e: natural_key(e.name)):
            if entry.is_dir():
                if entry.name.startswith((".", "_")):
                    n = sum(1 for _ in Path(entry.path).rglob("*") if _.is_file())
                    scan.ignored.append(f"{entry.name}/: folder starting with '{entry.name[0]}' ({n} files)")
                else:
                    ident_dirs.append(Path(entry.path))
            elif entry.name.lower().endswith(IMAGE_SUFFIXES):
                scan.ignored.append(f"{entry.name}: image outside an identity folder")
        if not ident_dirs:
            raise InputError(f"--input {root}: no identity folders (expected ROOT/<identity>/*.jpg ...)")
        other = 0
        for d in ident_dirs:
            ident = d.name
            files = []
            for e in sorted(os.scandir(d), key=lambda e: natural_key(e.name)):
                if e.is_dir():
                    scan.ignored.append(f"{ident}/{e.name}/: nested folder")
                elif e.name.lower().endswith(IMAGE_SUFFIXES) and not e.name.startswith("."):
                    files.append(Path(e.path))
                else:
                    other += 1
            for p in files:
                key = keys(ident, p.stem)
                relp = f"{ident}/{p.name}"
                scan.items.append(Item(key=key, identity=ident, meta={"path": relp}, payload={"path": str(p)},
                                       origin=relp))
                lookup[relp] = key
                basenames.setdefault(p.name, []).append(key)
                paths.append(p)
        if other:
            scan.ignored.append(f"{other} non-image file(s) inside identity folders")
        for name, ks in basenames.items():
            if len(ks) == 1:
                lookup.setdefault(name, ks[0])
        if not scan.items:
            raise InputError(f"--input {root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the identity folders")
        ext = choose_image_ext(paths)
        ids = {it.identity for it in scan.items}
        if getattr(args, "twins", None) is not None:
            scan.twin_pairs = read_twins(require_file(args.twins, "--twins"), ids, scan.faults)
        if getattr(args, "pairs", None) is not None:
            scan.pairs = resolve_pairs(require_file(args.pairs, "--pairs"), root, lookup, scan.faults)
        scan.notes = {"image_ext": ext}
        scan.loader = FolderLoader(ext)
        return scan


SOURCE = FolderSource()
