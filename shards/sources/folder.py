"""``folder``: one directory per identity (the DCAL twin layout; also ORL faces).

::

    ROOT/<identity>/*.{jpg,jpeg,png,pgm,gif,bmp}      (case-insensitive suffixes)
    --twins twin_pairs.json   [["id_a", "id_b"], ...]   (optional)
    --pairs test_pairs.json   [{"img1": ..., "img2": ..., "label": 0|1}, ...]   (optional)

The original DCAL layout is understood too::

    ROOT/{train,val,test}/<identity>/*.jpg            (split folders: kept, not redrawn)
    ROOT/[<split>/]dataset_infor.json or ROOT/<split>_dataset_infor.json
        {"<identity>": ["path/to/img.jpg", ...], ...}  (then the images come from this list)
    ROOT/twin_pairs_infor.json                          (read when --twins is not given)
        [["id_a", "id_b"], ...] | {"twin_pairs": [...]} | {"train": [...], "val": [...], "test": [...]}
        (a pair may also be {"id1": ..., "id2": ...})

* Split folders: when ROOT holds ``train``/``val``/``test`` folders, each is a
  ``<identity>/`` tree and its samples stay in that split (an identity may be
  in several); ``--splits``/``--split-by``/``--pairs-split`` are then not used,
  other top-level folders are ignored (listed).
* ``dataset_infor.json``: a relative path is read from the JSON's folder; a path
  not found there (e.g. the absolute path of the machine that wrote the file)
  is looked up as ``<split folder>/<identity>/<file name>``. A listed path
  leading outside ROOT (``..``, a symlink, an absolute path that exists
  elsewhere), like an image symlinked out of an identity folder, refuses the
  input (``shards.sources.inside_input``). Entries not found are faults ("bad
  dataset_infor entry").

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

from . import (IMAGE_SUFFIXES, Fault, InputError, Item, KeyMaker, Scan, Source, choose_image_ext, inside_input,
               natural_key, open_regular, read_image, require_dir, require_file)


class FolderLoader:
    def __init__(self, ext: str):
        self.ext = ext

    def __call__(self, item: Item) -> dict[str, Any]:
        f, _ = read_image(item.payload["path"], self.ext)
        return {f"image.{self.ext}": f}


def read_twins(path: Path, identities: set[str], faults: list[Fault]) -> list[tuple[str, str]]:
    try:
        data = read_twin_info(path)
    except InputError as e:
        raise InputError(f"--twins {e}") from None
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


def read_json(path: Path, what: str) -> Any:
    """A regular file's JSON, or one :class:`InputError` line naming ``what``."""
    try:
        with open_regular(path, "r", encoding="utf-8") as f:
            return json.loads(f.read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{what}: not readable JSON ({type(e).__name__}: {e})") from None


def resolve_pairs(path: Path, root: Path, lookup: dict[str, str], faults: list[Fault]) -> list[tuple[str, str, int]]:
    """``[{"img1","img2","label"}]`` -> (key1, key2, label); ``lookup`` maps names to keys."""
    data = read_json(path, f"--pairs {path}")
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


SPLIT_FOLDERS = ("train", "val", "test")
DATASET_INFO = "dataset_infor.json"      # the original DCAL code's {identity: [image paths]}
TWIN_INFO = "twin_pairs_infor.json"      # the original DCAL code's twin pairs


def identity_folder_images(base: Path, scan: Scan, prefix: str = "", root: Path | None = None
                           ) -> list[tuple[str, Path]]:
    """``[(identity, image)]`` of ``base/<identity>/*`` in natural order (what is passed over
    goes into ``scan.ignored``, named with ``prefix``). An image (or identity folder) that
    is a symlink out of ``root`` (default ``base``) refuses the input (:func:`inside_input`)."""
    out: list[tuple[str, Path]] = []
    other = 0
    for d in sorted(os.scandir(base), key=lambda e: natural_key(e.name)):
        if not d.is_dir():
            if d.name.lower().endswith(IMAGE_SUFFIXES):
                scan.ignored.append(f"{prefix}{d.name}: image outside an identity folder")
            continue
        if d.name.startswith((".", "_")):
            n = sum(1 for _ in Path(d.path).rglob("*") if _.is_file())
            scan.ignored.append(f"{prefix}{d.name}/: folder starting with '{d.name[0]}' ({n} files)")
            continue
        for e in sorted(os.scandir(d.path), key=lambda e: natural_key(e.name)):
            if e.is_dir():
                scan.ignored.append(f"{prefix}{d.name}/{e.name}/: nested folder")
            elif e.name.lower().endswith(IMAGE_SUFFIXES) and not e.name.startswith("."):
                out.append((d.name, inside_input(e.path, root or base, f"{prefix}{d.name}/{e.name}")))
            else:
                other += 1
    if other:
        scan.ignored.append(f"{prefix}{other} non-image file(s) inside identity folders")
    return out


def dataset_info_images(info: Path, root: Path, base: Path, faults: list[Fault]) -> list[tuple[str, Path]]:
    """``[(identity, image)]`` listed by a ``dataset_infor.json`` (``{identity: [paths]}``).

    A relative path is read from the JSON file's folder; a path that is not there
    (e.g. the absolute path of the machine the file was made on) is looked up as
    ``base/<identity>/<file name>``. A listed path that leads outside ``root`` (``..``, a
    symlink, an absolute path that exists elsewhere) refuses the input (:func:`inside_input`);
    an absolute path that does not exist here is the writing machine's and only its
    ``<identity>/<file name>`` inside ``root`` is looked up."""
    try:
        with open_regular(info, "r", encoding="utf-8") as f:
            data = json.loads(f.read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{info}: not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise InputError(f"{info}: expected {{identity: [image paths]}}")
    out: list[tuple[str, Path]] = []
    for ident in sorted(data, key=natural_key):
        for i, text in enumerate(data[ident]):
            where = f"{info.name}[{ident}][{i}]"
            if not isinstance(text, str) or not text.lower().endswith(IMAGE_SUFFIXES):
                faults.append(Fault("bad dataset_infor entry", where, f"not an image path: {text!r}"[:200]))
                continue
            p = Path(text.replace("\\", "/"))
            listed = p if p.is_absolute() else info.parent / p
            if not p.is_absolute() or listed.exists():
                inside_input(listed, root, where)
            found = next((c for c in (listed, base / str(ident) / p.name) if c.is_file()), None)
            if found is None:
                faults.append(Fault("bad dataset_infor entry", where, f"image not found: {text}"[:300]))
            else:
                out.append((str(ident), inside_input(found, root, where)))
    return out


def read_twin_info(path: Path) -> list[Any]:
    """Twin pairs of a ``twin_pairs_infor.json``: a list of ``[id_a, id_b]`` (or
    ``{"id1", "id2"}``), under ``"twin_pairs"`` or per split (``{"train": [...], ...}``)."""
    data = read_json(path, str(path))
    if isinstance(data, dict) and "twin_pairs" in data:
        data = data["twin_pairs"]
    if isinstance(data, dict):  # per split
        data = [p for v in data.values() if isinstance(v, list) for p in v]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of [id_a, id_b] twin pairs")
    return [[p.get("id1"), p.get("id2")] if isinstance(p, dict) and {"id1", "id2"} <= set(p) else p for p in data]


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(os.path.normpath(path)).relative_to(os.path.normpath(root)).as_posix()
    except ValueError:  # a listed file reached through a symlink inside ROOT
        return Path(os.path.relpath(path.resolve(), root.resolve())).as_posix()


class FolderSource(Source):
    name = "folder"
    help = ("ROOT/[{train,val,test}/]<identity>/*.{jpg,png,pgm,...} [dataset_infor.json] [twin_pairs_infor.json] "
            "[--twins twin_pairs.json] [--pairs test_pairs.json]")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("folder options")
        g.add_argument("--twins", type=Path, help="folder: JSON list of [identity_a, identity_b] twin pairs "
                       f"(default: ROOT/{TWIN_INFO} when present)")
        g.add_argument("--pairs", type=Path, help="folder: JSON list of {img1, img2, label} evaluation pairs")

    def scan(self, input_path: Path | None, args: argparse.Namespace) -> Scan:
        root = require_dir(input_path)
        scan = Scan(items=[])
        keys = KeyMaker()
        lookup: dict[str, str] = {}
        basenames: dict[str, list[str]] = {}
        paths: list[Path] = []
        tops = [e for e in sorted(os.scandir(root), key=lambda e: natural_key(e.name)) if e.is_dir()]
        split_dirs = [Path(e.path) for e in tops if e.name in SPLIT_FOLDERS]
        if split_dirs:  # the original's data/{train,val,test}/person_*/: keep its splits
            scan.ignored += [f"{e.name}/: not a split folder ({', '.join(SPLIT_FOLDERS)})" for e in tops
                             if e.name not in SPLIT_FOLDERS and not e.name.startswith((".", "_"))]
            parts: list[tuple[str | None, Path]] = [(d.name, d) for d in split_dirs]
        else:
            parts = [(None, root)]
        info_read = []
        for split, base in parts:
            infos = [base / DATASET_INFO] + ([root / f"{split}_{DATASET_INFO}"] if split else [])
            info = next((f for f in infos if f.is_file()), None)
            if info is not None:
                inside_input(info, root, info.relative_to(root).as_posix())
                entries = dataset_info_images(info, root, base, scan.faults)
                info_read.append(info.relative_to(root).as_posix())
            else:
                entries = identity_folder_images(base, scan, f"{split}/" if split else "", root)
            for ident, p in entries:
                key = keys(ident, p.stem)
                relp = _relative(p, root)
                scan.items.append(Item(key=key, identity=ident, meta={"path": relp}, payload={"path": str(p)},
                                       origin=relp))
                if split:
                    scan.splits[key] = split
                lookup[relp] = key
                lookup.setdefault(f"{ident}/{p.name}", key)
                basenames.setdefault(p.name, []).append(key)
                paths.append(p)
        if not scan.items:
            if not split_dirs and not info_read and not any(not e.name.startswith((".", "_")) for e in tops):
                raise InputError(f"--input {root}: no identity folders (expected ROOT/<identity>/*.jpg ...)")
            raise InputError(f"--input {root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the identity folders")
        for name, ks in basenames.items():
            if len(ks) == 1:
                lookup.setdefault(name, ks[0])
        ext = choose_image_ext(paths)
        ids = {it.identity for it in scan.items}
        twins_file = getattr(args, "twins", None)
        if twins_file is None and (root / TWIN_INFO).is_file():
            twins_file = inside_input(root / TWIN_INFO, root, TWIN_INFO)
        if twins_file is not None:
            scan.twin_pairs = read_twins(require_file(twins_file, "--twins"), ids, scan.faults)
        if getattr(args, "pairs", None) is not None:
            scan.pairs = resolve_pairs(require_file(args.pairs, "--pairs"), root, lookup, scan.faults)
        scan.notes = {"image_ext": ext, "splits_from": "folders" if split_dirs else "drawn",
                      "dataset_infor": info_read, "twins_from": str(twins_file) if twins_file else None}
        scan.loader = FolderLoader(ext)
        return scan


SOURCE = FolderSource()
