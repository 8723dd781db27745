"""``thz``: terahertz face captures listed in triplet CSVs.

::

    ROOT/**/*.csv   (or --csv FILE ...), columns:
      anchor,positive,negative[,visible_concealed,visible_unconcealed[,visible_negative]]
    image names: <identity>_<posture>_<sample>.png
      posture b1b..b5b = concealed, n1n..n5n = unconcealed; 1 front 2 left 3 right 4 up 5 down

A CSV value is looked up relative to the CSV's folder, then ROOT, then by file
name anywhere under ROOT. One sample per CSV row, as the original trains them
(a row repeated word for word is kept once; repeats are counted in
``created_with.notes.duplicate_rows``):

* ``thz.<ext>``: the anchor THz image (normally concealed, ``b``);
* ``thz_target.<ext>``: the row's positive, the same identity unconcealed
  (``n``): the verification positive and the reconstruction target;
* ``thz_negative.<ext>``: the row's negative, another identity;
* ``vis.<ext>`` / ``vis_target.<ext>`` / ``vis_negative.<ext>``:
  ``visible_concealed`` / ``visible_unconcealed`` / ``visible_negative`` when
  every CSV has those columns;
* ``json``: ``identity``, ``posture`` (front/left/right/up/down),
  ``concealed`` (unconcealed/concealed), ``sample`` (the ``<sample>`` part),
  ``target_posture`` (0-4, the posture of ``thz_target``: a row whose positive
  shows another posture asks for a pose change too; such rows are kept and
  counted in ``created_with.notes.target_posture_differs``),
  ``negative_identity`` (the negative's identity name: it may be a person with
  no anchor row), ``negative_posture`` (0-4), ``files`` (the CSV values).

The THz recipes train each sample's own triplet (:mod:`recipes.thz`): the
concealed anchor, its unconcealed positive, its negative.

Splits: a CSV named for a split keeps it (``--splits``/``--split-by`` are then
not used): its file name (without ``.csv``, lower case) is, starts with
``<name>_`` or ends with ``_<name>`` for ``train``, ``val`` (``validation``) or
``test``; ``train_val`` (``trainval``) rows are split as the original splits its
train_val CSV: per anchor (identity, posture), 15 % of the sample numbers (at
least one, never all; none of a stratum with one sample) go to ``val``, with
every row whose anchor has that sample number, drawn with ``--seed``. CSVs named
for no split: the splits are drawn (``--splits``); a mix of both is refused.

Bad rows (missing column value, unparsable name, anchor and positive of
different identities, a positive that is not unconcealed, a negative of the
anchor's identity) are faults ("bad csv row"); missing image files are
"missing file".
"""
from __future__ import annotations

import argparse
import csv
import os
import random
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
VISIBLE_NEGATIVE = "visible_negative"
# CSV name -> split (None: train_val, split further as the original does); longest names first
CSV_SPLITS = (("train_val", None), ("trainval", None), ("validation", "val"), ("train", "train"),
              ("test", "test"), ("val", "val"))
VAL_RATIO = 0.15  # the original's share of train_val sample numbers that validate


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


def csv_split(path: Path) -> tuple[bool, str | None]:
    """``(named, split)`` of a CSV from its name: ``(True, None)`` for train_val,
    ``(False, None)`` when the name gives no split."""
    stem = path.stem.strip().lower().replace("-", "_")
    for name, split in CSV_SPLITS:
        if stem == name or stem.startswith(name + "_") or stem.endswith("_" + name):
            return True, split
    return False, None


def train_val_split(items: list[Item], seed: int) -> dict[str, str]:
    """The original's train_val cut: per anchor (identity, posture), ``VAL_RATIO`` of the
    sample numbers (at least one, never all) validate, with all rows of those anchors."""
    strata: dict[tuple[str, str], set[str]] = {}
    for it in items:
        strata.setdefault((it.identity, it.labels["posture"]), set()).add(it.meta["sample"])
    val: set[tuple[str, str, str]] = set()
    for (ident, posture), samples in sorted(strata.items()):
        if len(samples) < 2:
            continue
        n = min(max(1, int(len(samples) * VAL_RATIO)), len(samples) - 1)
        rng = random.Random(f"thz-train-val-{seed}-{ident}-{posture}")
        val.update((ident, posture, x) for x in rng.sample(sorted(samples, key=natural_key), n))
    return {it.key: "val" if (it.identity, it.labels["posture"], it.meta["sample"]) in val else "train"
            for it in items}


def _triplet_problem(r: dict[str, str], a: tuple | None, pos: tuple | None, neg: tuple | None) -> str | None:
    """Why a row's triplet is unusable (None when it is usable)."""
    for name, parsed in (("anchor", a), ("positive", pos), ("negative", neg)):
        if parsed is None:
            return f"file name {r[name]!r} is not <identity>_<b1b..b5b|n1n..n5n>_<sample>"
    if a[0] != pos[0]:
        return f"anchor identity {a[0]!r} != positive identity {pos[0]!r}"
    if pos[2] != 0:
        return f"positive {r['positive']!r} is not unconcealed (n1n..n5n)"
    if neg[0] == a[0]:
        return f"negative {r['negative']!r} is of the anchor's identity {a[0]!r}"
    return None


class _Rows:
    """The items of the CSV rows read so far (one per distinct row) and what they tell."""

    def __init__(self, root: Path, faults: list[Fault]):
        self.root, self.faults = root, faults
        self.locate = _Finder(root)
        self.keys = KeyMaker()
        self.items: list[Item] = []
        self.splits: dict[str, str | None] = {}   # key -> the CSV's split (None: train_val)
        self.seen: set[tuple[str | None, ...]] = set()
        self.duplicates = self.other_posture = 0
        self.visible: tuple[str, ...] | None = None    # the visible columns every CSV has so far
        self.visible_mixed = False

    def read_csv(self, path: Path, split: str | None) -> None:
        with open_regular(path, "r", newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            if not set(REQUIRED) <= set(header):
                self.faults.append(Fault("bad csv", rel(path, self.root),
                                         f"needs columns {','.join(REQUIRED)}; has {','.join(header)}"))
                return
            vis = (VISIBLE + ((VISIBLE_NEGATIVE,) if VISIBLE_NEGATIVE in header else ())
                   if set(VISIBLE) <= set(header) else ())
            if self.visible is None:
                self.visible = vis
            elif self.visible != vis:
                self.visible_mixed = True
                self.visible = tuple(c for c in self.visible if c in vis)
            for line, row in enumerate(reader, start=2):
                self.row(lower_header(row), f"{rel(path, self.root)}:{line}", path.parent, vis, split)

    def row(self, r: dict[str, str], where: str, csv_dir: Path, vis: tuple[str, ...], split: str | None) -> None:
        empty = [c for c in REQUIRED + vis if not r.get(c)]
        if empty:
            self.faults.append(Fault("bad csv row", where, f"empty {', '.join(empty)}"))
            return
        a, pos, neg = parse_name(r["anchor"]), parse_name(r["positive"]), parse_name(r["negative"])
        problem = _triplet_problem(r, a, pos, neg)
        if problem:
            self.faults.append(Fault("bad csv row", where, problem))
            return
        names = (split, *(Path(r[c]).name for c in REQUIRED))  # a row of two splits' CSVs is in both
        if names in self.seen:
            self.duplicates += 1
            return
        self.seen.add(names)
        files = {base: str(self.locate(r[col], csv_dir, where)) for base, col in FIELDS.items() if col in
                 REQUIRED + vis}
        key = self.keys(Path(r["anchor"]).stem)
        ident, posture, concealed, sample = a
        self.other_posture += pos[1] != posture
        self.splits[key] = split
        self.items.append(Item(
            key=key, identity=ident, labels={"posture": POSTURES[posture], "concealed": CONCEALED[concealed]},
            meta={"sample": sample, "target_posture": pos[1], "negative_identity": neg[0],
                  "negative_posture": neg[1], "files": {c: r[c] for c in REQUIRED + VISIBLE + (VISIBLE_NEGATIVE,)
                                                        if r.get(c)}},
            payload={"files": files}, origin=where))


# stored field base name -> CSV column
FIELDS = {"thz": "anchor", "thz_target": "positive", "thz_negative": "negative", "vis": "visible_concealed",
          "vis_target": "visible_unconcealed", "vis_negative": VISIBLE_NEGATIVE}


def _fixed_splits(rows: _Rows, named: dict[Path, tuple[bool, str | None]], root: Path,
                  seed: int) -> dict[str, str]:
    """The CSVs' own splits (key -> split), or ``{}`` when no CSV name gives one."""
    if not any(n for n, _ in named.values()):
        return {}
    unnamed = [rel(p, root) for p, (n, _) in named.items() if not n]
    if unnamed:
        given = next(rel(p, root) for p, (n, _) in named.items() if n)
        raise InputError(f"--input {root}: CSV {unnamed[0]} names no split (train, val, test, train_val) while "
                         f"{given} does: name every CSV for its split, or none")
    out = {k: v for k, v in rows.splits.items() if v is not None}
    out.update(train_val_split([it for it in rows.items if rows.splits[it.key] is None], seed))
    return out


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
        rows = _Rows(root, scan.faults)
        named = {path: csv_split(path) for path in csvs}
        for path in csvs:
            try:
                rows.read_csv(path, named[path][1])
            except NotRegularFile as e:
                scan.faults.append(Fault("not a regular file", rel(path, root), f"a {e.what}: not opened"))
            except (OSError, UnicodeDecodeError, csv.Error) as e:
                scan.faults.append(Fault("bad csv", rel(path, root), f"{type(e).__name__}: {e}"))
        scan.items = rows.items
        if not scan.items:
            raise InputError(f"--input {root}: no usable triplet rows in {len(csvs)} CSV file(s)"
                             + (f" (first fault: {scan.faults[0]})" if scan.faults else ""))
        if rows.visible_mixed:
            scan.ignored.append("visible columns are missing in some CSVs: only those every CSV has are stored")
        stored = {b for b, c in FIELDS.items() if c in REQUIRED + (rows.visible or ())}
        for it in scan.items:
            it.payload["files"] = {b: f for b, f in it.payload["files"].items() if b in stored}
        scan.splits = _fixed_splits(rows, named, root, int(getattr(args, "seed", 0) or 0))
        names = sorted(stored)
        exts = {n: choose_image_ext([it.payload["files"][n] for it in scan.items]) for n in names}
        scan.notes = {"csvs": [rel(p, root) for p in csvs], "duplicate_rows": rows.duplicates,
                      "target_posture_differs": rows.other_posture, "image_ext": exts,
                      "splits_from": "csv names" if scan.splits else "drawn"}
        scan.items.sort(key=lambda it: natural_key(it.key))
        scan.loader = ThzLoader(exts)
        return scan


SOURCE = ThzSource()
