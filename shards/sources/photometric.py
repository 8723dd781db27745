"""``photometric``: photometric-stereo captures (albedo / normal / depth arrays).

::

    ROOT/<labels>.csv      columns id, session, Gender, Spectacles, Facial_Hair, Pose, Emotion
                           (header case-insensitive; the label columns are optional)
    ROOT/data/<id>/<session>/{albedo,normal,depth}.npy     (any subset)

``--csv FILE`` picks the CSV (default: the only ``*.csv`` directly in ROOT).
``--maps albedo,normal,depth`` picks the arrays (default: every map present
for at least one row); a row missing a picked map is a fault ("missing file").

Per sample (key ``<id>_<session>``): ``albedo.npy`` / ``normal.npy`` /
``depth.npy`` (the original files; numeric arrays read with
``allow_pickle=False``: an object array is an "undecodable array" fault, a
FIFO/socket/device is "not a regular file" and never opened) and ``json``:
``identity`` (the ``id``), ``session``, and ``gender``, ``spectacles``,
``facial_hair``, ``pose``, ``emotion`` as class indices; their schemas are the
sorted distinct CSV values (numerically sorted when all are integers). Bad
rows (empty id/session, a duplicate (id, session)) are faults ("bad csv row").
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

from . import (Fault, InputError, Item, KeyMaker, Scan, Source, find_csvs, inside_input, is_regular, lower_header,
               open_regular,
               read_npy, rel, require_dir)

MAPS = ("albedo", "normal", "depth")
LABEL_COLUMNS = ("gender", "spectacles", "facial_hair", "pose", "emotion")


class PhotometricLoader:
    def __init__(self, maps: tuple[str, ...]):
        self.maps = maps

    def __call__(self, item: Item) -> dict[str, Any]:
        out = {}
        shape = None
        for m in self.maps:
            f, arr = read_npy(Path(item.payload["dir"]) / f"{m}.npy")
            if shape is not None and arr.shape[:2] != shape:
                from . import SampleError

                raise SampleError("inconsistent arrays", f"{item.payload['dir']}: {m}.npy is {arr.shape[:2]}, "
                                                         f"other maps are {shape}")
            shape = arr.shape[:2]
            out[f"{m}.npy"] = f
        return out


class PhotometricSource(Source):
    name = "photometric"
    help = "CSV id,session,Gender,Spectacles,Facial_Hair,Pose,Emotion + data/<id>/<session>/{albedo,normal,depth}.npy"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("photometric options")
        g.add_argument("--maps", help="photometric: comma list of albedo,normal,depth (default: those present)")

    def scan(self, input_path: Path | None, args: argparse.Namespace) -> Scan:
        root = require_dir(input_path)
        given = getattr(args, "csv", None)
        csv_faults: list[Fault] = []
        if given:
            csvs = find_csvs(root, given)
        else:
            found = sorted(p for p in root.glob("*.csv") if not p.is_dir())
            csvs = [inside_input(p, root, p.name) for p in found if is_regular(p)]
            for p in found:  # a FIFO, socket or device named *.csv: reported, never opened
                if p not in csvs:
                    csv_faults.append(Fault("not a regular file", p.name, "not opened"))
            if len(csvs) > 1:
                raise InputError(f"--input {root}: several CSV files ({', '.join(p.name for p in csvs)}); "
                                 "pick one with --csv")
        if not csvs:
            raise InputError(f"--input {root}: no label CSV (id, session, Gender, ...) in it"
                             + (f" ({csv_faults[0]})" if csv_faults else ""))
        data = root / "data"
        if not data.is_dir():
            raise InputError(f"--input {root}: no data/ folder (data/<id>/<session>/albedo.npy ...)")
        maps_arg = getattr(args, "maps", None)
        if maps_arg:
            maps = tuple(m.strip() for m in maps_arg.split(",") if m.strip())
            bad = [m for m in maps if m not in MAPS]
            if bad or not maps:
                raise InputError(f"--maps: {', '.join(bad) or 'empty'} not among {', '.join(MAPS)}")
        else:
            maps = None
        scan = Scan(items=[], faults=csv_faults)
        keys = KeyMaker()
        seen: set[tuple[str, str]] = set()
        values: dict[str, set[str]] = {c: set() for c in LABEL_COLUMNS}
        present: set[str] = set()
        label_cols: list[str] = []
        for path in csvs:
            try:
                with open_regular(path, "r", newline="", encoding="utf-8-sig") as f:
                    reader = csv.DictReader(f)
                    header = [h.strip().lower() for h in (reader.fieldnames or [])]
                    if not {"id", "session"} <= set(header):
                        raise InputError(f"{path}: needs columns id, session (has {', '.join(header)})")
                    label_cols = [c for c in LABEL_COLUMNS if c in header]
                    for line, row in enumerate(reader, start=2):
                        where = f"{rel(path, root)}:{line}"
                        if None in row:  # more values than columns
                            scan.faults.append(Fault("bad csv row", where, "more values than columns"))
                            continue
                        r = lower_header(row)
                        ident, session = r.get("id") or "", r.get("session") or ""
                        missing = [c for c in ["id", "session"] + label_cols if r.get(c) in (None, "")]
                        if missing:
                            scan.faults.append(Fault("bad csv row", where, f"empty {', '.join(missing)}"))
                            continue
                        if (ident, session) in seen:
                            scan.faults.append(Fault("bad csv row", where, f"duplicate id {ident} session {session}"))
                            continue
                        seen.add((ident, session))
                        d = inside_input(data / ident / session, root, where)
                        for m in MAPS:
                            if (d / f"{m}.npy").is_file():
                                inside_input(d / f"{m}.npy", root, where)  # (a symlinked map)
                                present.add(m)
                        labels = {c: str(r[c]) for c in label_cols}
                        for c, v in labels.items():
                            values[c].add(v)
                        scan.items.append(Item(key=keys(ident, session), identity=ident, labels=labels,
                                               meta={"session": session}, payload={"dir": str(d)},
                                               origin=f"data/{ident}/{session}"))
            except (OSError, UnicodeDecodeError, csv.Error) as e:
                raise InputError(f"{path}: unreadable CSV ({type(e).__name__}: {e})") from None
        if not scan.items:
            raise InputError(f"--input {root}: no usable CSV rows"
                             + (f" (first fault: {scan.faults[0]})" if scan.faults else ""))
        if maps is None:
            maps = tuple(m for m in MAPS if m in present)
            if not maps:
                raise InputError(f"--input {root}: no albedo/normal/depth .npy under data/<id>/<session>/")
        for c in label_cols:
            vals = values[c]
            scan.schemas[c] = sorted(vals, key=int) if all(v.lstrip("-").isdigit() for v in vals) else sorted(vals)
        scan.notes = {"csv": [rel(p, root) for p in csvs], "maps": list(maps)}
        scan.loader = PhotometricLoader(maps)
        return scan


SOURCE = PhotometricSource()
