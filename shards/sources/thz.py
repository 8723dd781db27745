"""``thz``: terahertz face captures listed in triplet CSVs.

::

    ROOT/**/*.csv   (or --csv FILE ...), columns:
      anchor,positive,negative[,visible_concealed,visible_unconcealed,visible_negative]
    image names: <identity>_<posture>_<sample>.png
      posture b1b..b5b = concealed, n1n..n5n = unconcealed; 1 front 2 left 3 right 4 up 5 down

A CSV value is looked up relative to the CSV's folder, then ROOT, then by file
name anywhere under ROOT. One sample per distinct anchor image (the first row
naming it wins; later rows are counted in ``created_with.notes``):

* ``thz.<ext>``: the anchor THz image (normally concealed, ``b``);
* ``thz_target.<ext>``: the row's positive, the same identity unconcealed
  (``n``): the reconstruction target;
* ``vis.<ext>`` / ``vis_target.<ext>``: ``visible_concealed`` /
  ``visible_unconcealed`` when the CSVs have those columns (the negative's
  visible image is not stored: negatives are other samples);
* ``json``: ``identity``, ``posture`` (front/left/right/up/down),
  ``concealed`` (unconcealed/concealed), ``sample`` (the ``<sample>`` part),
  ``target_posture`` (0-4, the posture of ``thz_target``: the THz recipes
  reconstruct the target from the anchor, so a row whose positive shows
  another posture asks for a pose change too; such rows are kept and counted
  in ``created_with.notes.target_posture_differs``), ``files`` (the CSV values).

The field names match the synthetic dataset, so THz recipes read both. The
triplets themselves are not stored: the ``triplet`` batching draws
(anchor, positive, negative) from identities (co-twin negatives when twins
exist). Bad rows (missing column value, unparsable name, anchor and positive
of different identities, a positive that is not unconcealed) are faults
("bad csv row"); missing image files are "missing file".
"""
from __future__ import annotations

import argparse
import csv
import os
import re
from pathlib import Path
from typing import Any

from . import (Fault, InputError, Item, KeyMaker, NotRegularFile, Scan, Source, choose_image_ext, find_csvs,
               inside_input, lower_header, natural_key, open_regular, read_image, rel, require_dir)

POSTURES = ["front", "left", "right", "up", "down"]
CONCEALED = ["unconcealed", "concealed"]
_NAME = re.compile(r"^(?P<id>.+)_(?P<a>[bn])(?P<p>[1-5])(?P<b>[bn])_(?P<sample>[^_]+)$")
REQUIRED = ("anchor", "positive", "negative")
VISIBLE = ("visible_concealed", "visible_unconcealed")


def parse_name(name: str) -> tuple[str, int, int, str] | None:
    """``<identity>_<b|n><1-5><b|n>_<sample>`` -> (identity, posture 0-4, concealed 0/1, sample)."""
    m = _NAME.match(Path(str(name)).stem)
    if not m or m["a"] != m["b"]:
        return None
    return m["id"], int(m["p"]) - 1, int(m["a"] == "b"), m["sample"]


class ThzLoader:
    def __init__(self, exts: dict[str, str]):
        self.exts = exts  # field base name -> stored extension

    def __call__(self, item: Item) -> dict[str, Any]:
        out = {}
        for name, path in item.payload["files"].items():
            f, _ = read_image(path, self.exts[name])
            out[f"{name}.{self.exts[name]}"] = f
        return out


class _Finder:
    """The file a CSV cell names, inside the input (:func:`inside_input`): an absolute
    path as given, else beside the CSV, else under the input root, else the first
    file of that name anywhere under the root (indexed on first need)."""

    def __init__(self, root: Path):
        self.root = root
        self.by_name: dict[str, list[Path]] | None = None

    def __call__(self, value: str, csv_dir: Path, where: str) -> Path:
        return inside_input(self._find(value, csv_dir), self.root, where)

    def _find(self, value: str, csv_dir: Path) -> Path:
        p = Path(value)
        if p.is_absolute():
            return p
        for base in (csv_dir, self.root):
            if (base / p).is_file():
                return base / p
        if self.by_name is None:
            self.by_name = {}
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for fn in filenames:
                    self.by_name.setdefault(fn, []).append(Path(dirpath) / fn)
        hits = self.by_name.get(p.name, [])
        return hits[0] if hits else csv_dir / p  # (a missing file is reported when loading)


def _triplet_problem(r: dict[str, str], a: tuple | None, pos: tuple | None) -> str | None:
    """Why a row's anchor/positive pair is unusable (None when it is usable)."""
    if a is None or pos is None:
        bad = r["anchor"] if a is None else r["positive"]
        return f"file name {bad!r} is not <identity>_<b1b..b5b|n1n..n5n>_<sample>"
    if a[0] != pos[0]:
        return f"anchor identity {a[0]!r} != positive identity {pos[0]!r}"
    if pos[2] != 0:
        return f"positive {r['positive']!r} is not unconcealed (n1n..n5n)"
    return None


class ThzSource(Source):
    name = "thz"
    help = "THz triplet CSVs: anchor,positive,negative[,visible_*]; <identity>_<b1b..n5n>_<sample>.png"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("thz / photometric options")
        g.add_argument("--csv", action="append", help="thz/photometric: CSV file(s) (default: every *.csv "
                                                      "under --input for thz, the one at its top for photometric)")

    def scan(self, input_path: Path | None, args: argparse.Namespace) -> Scan:
        root = require_dir(input_path)
        csv_faults: list[Fault] = []  # *.csv FIFOs, sockets, devices: reported, never opened
        csvs = find_csvs(root, getattr(args, "csv", None), csv_faults)
        if not csvs:
            raise InputError(f"--input {root}: no *.csv triplet files (columns anchor,positive,negative)"
                             + (f" (first fault: {csv_faults[0]})" if csv_faults else ""))
        scan = Scan(items=[], faults=csv_faults, schemas={"posture": POSTURES, "concealed": CONCEALED})
        locate = _Finder(root)
        keys = KeyMaker()
        seen: dict[str, str] = {}
        duplicates = 0
        other_posture = 0
        has_visible: bool | None = None
        visible_mixed = False
        for path in csvs:
            try:
                with open_regular(path, "r", newline="", encoding="utf-8-sig") as f:
                    reader = csv.DictReader(f)
                    header = [h.strip().lower() for h in (reader.fieldnames or [])]
                    if not set(REQUIRED) <= set(header):
                        scan.faults.append(Fault("bad csv", rel(path, root),
                                                 f"needs columns {','.join(REQUIRED)}; has {','.join(header)}"))
                        continue
                    vis = set(VISIBLE) <= set(header)
                    if has_visible is None:
                        has_visible = vis
                    elif has_visible != vis:
                        visible_mixed = True
                    for line, row in enumerate(reader, start=2):
                        where = f"{rel(path, root)}:{line}"
                        r = lower_header(row)
                        need = REQUIRED + (VISIBLE if has_visible else ())
                        empty = [c for c in need if not r.get(c)]
                        if empty:
                            scan.faults.append(Fault("bad csv row", where, f"empty {', '.join(empty)}"))
                            continue
                        a, pos = parse_name(r["anchor"]), parse_name(r["positive"])
                        problem = _triplet_problem(r, a, pos)
                        if problem:
                            scan.faults.append(Fault("bad csv row", where, problem))
                            continue
                        anchor_id = Path(r["anchor"]).name
                        if anchor_id in seen:
                            duplicates += 1
                            continue
                        files = {"thz": str(locate(r["anchor"], path.parent, where)),
                                 "thz_target": str(locate(r["positive"], path.parent, where))}
                        if has_visible:
                            files["vis"] = str(locate(r["visible_concealed"], path.parent, where))
                            files["vis_target"] = str(locate(r["visible_unconcealed"], path.parent, where))
                        key = keys(Path(r["anchor"]).stem)
                        seen[anchor_id] = key
                        ident, posture, concealed, sample = a
                        if pos[1] != posture:
                            other_posture += 1
                        scan.items.append(Item(
                            key=key, identity=ident,
                            labels={"posture": POSTURES[posture], "concealed": CONCEALED[concealed]},
                            meta={"sample": sample, "target_posture": pos[1], "files": {k: r[c] for k, c in
                                                              (("anchor", "anchor"), ("positive", "positive"),
                                                               ("visible_concealed", "visible_concealed"),
                                                               ("visible_unconcealed", "visible_unconcealed"))
                                                              if r.get(c)}},
                            payload={"files": files}, origin=where))
            except NotRegularFile as e:
                scan.faults.append(Fault("not a regular file", rel(path, root), f"a {e.what}: not opened"))
            except (OSError, UnicodeDecodeError, csv.Error) as e:
                scan.faults.append(Fault("bad csv", rel(path, root), f"{type(e).__name__}: {e}"))
        if visible_mixed:
            scan.ignored.append("visible columns are missing in some CSVs: visible images not stored")
            for it in scan.items:
                it.payload["files"].pop("vis", None)
                it.payload["files"].pop("vis_target", None)
        if not scan.items:
            raise InputError(f"--input {root}: no usable triplet rows in {len(csvs)} CSV file(s)"
                             + (f" (first fault: {scan.faults[0]})" if scan.faults else ""))
        names = sorted(scan.items[0].payload["files"])
        exts = {n: choose_image_ext([it.payload["files"][n] for it in scan.items]) for n in names}
        scan.notes = {"csvs": [rel(p, root) for p in csvs], "duplicate_anchor_rows": duplicates,
                      "target_posture_differs": other_posture, "image_ext": exts}
        scan.items.sort(key=lambda it: natural_key(it.key))
        scan.loader = ThzLoader(exts)
        return scan


SOURCE = ThzSource()
