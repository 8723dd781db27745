"""``facecom``: FaceCom-style ``images/`` + ``annotations.json``.

Accepted ``ROOT/annotations.json`` schemas (one of):

* a list of records: ``[{"image": "0001.jpg", "identity": "p17", "gender": "male"}, ...]``;
* ``{"annotations": [records]}`` (or ``"images"``);
* a mapping ``{"0001.jpg": {"identity": "p17", "gender": "male"}, ...}``.

Record fields: ``image`` (aliases ``file``, ``file_name``, ``filename``,
``path``): the file relative to ``ROOT/images/``; ``identity`` (aliases
``id``, ``identity_id``, ``person_id``, ``subject``; required); ``gender``
(optional; a class name such as ``female``/``male`` or an integer code). The
gender schema is the sorted distinct values (integers: numeric order, so
codes 0/1 keep their meaning). Other record fields are ignored.

Per sample (key: the image path without suffix): ``image.<ext>`` and
``json`` (``identity``, ``gender`` when present, ``path``). Records missing
the image or identity are faults ("bad annotation"); images without a record
are ignored (counted in the report).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from . import (IMAGE_SUFFIXES, Fault, InputError, Item, KeyMaker, Scan, Source, choose_image_ext, inside_input,
               open_regular,
               read_image, require_dir, require_file)

IMAGE_KEYS = ("image", "file", "file_name", "filename", "path")
IDENTITY_KEYS = ("identity", "id", "identity_id", "person_id", "subject")


class FacecomLoader:
    def __init__(self, ext: str):
        self.ext = ext

    def __call__(self, item: Item) -> dict[str, Any]:
        f, _ = read_image(item.payload["path"], self.ext)
        return {f"image.{self.ext}": f}


def _records(data: Any) -> list[tuple[str, Any]]:
    """(where, record) with the image name folded in as ``image``."""
    if isinstance(data, dict):
        for k in ("annotations", "images"):
            if isinstance(data.get(k), list):
                data = data[k]
                break
        else:
            return [(str(name), {**rec, "image": name} if isinstance(rec, dict) else rec)
                    for name, rec in data.items()]
    if not isinstance(data, list):
        raise InputError("annotations.json: expected a list of records, {'annotations': [...]} "
                         "or {image: record}")
    return [(f"[{i}]", r) for i, r in enumerate(data)]


class FacecomSource(Source):
    name = "facecom"
    help = "images/ + annotations.json (records: image, identity, gender)"

    def scan(self, input_path: Path | None, args: argparse.Namespace) -> Scan:
        root = require_dir(input_path)
        images = require_dir(root / "images", "--input/images")
        ann = inside_input(require_file(root / "annotations.json", "--input/annotations.json"), root,
                           "annotations.json")
        try:
            with open_regular(ann, "r", encoding="utf-8") as f:
                data = json.loads(f.read())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{ann}: not readable JSON ({type(e).__name__}: {e})") from None
        scan = Scan(items=[])
        keys = KeyMaker()
        genders: set[str] = set()
        used: set[str] = set()
        for where, rec in _records(data):
            where = f"annotations.json{where if where.startswith('[') else ':' + where}"
            if not isinstance(rec, dict):
                scan.faults.append(Fault("bad annotation", where, f"not a record: {rec!r}"[:200]))
                continue
            img = next((rec[k] for k in IMAGE_KEYS if rec.get(k) not in (None, "")), None)
            ident = next((rec[k] for k in IDENTITY_KEYS if rec.get(k) not in (None, "")), None)
            if img is None or ident is None:
                scan.faults.append(Fault("bad annotation", where, f"needs image and identity, has "
                                                                  f"{', '.join(sorted(rec)) or 'nothing'}"))
                continue
            relp = str(img).replace("\\", "/")
            if relp.startswith("images/") and not (images / relp).exists():
                relp = relp[len("images/"):]
            inside_input(images / relp, root, where)  # (an absolute path stays absolute)
            if relp in used:
                scan.faults.append(Fault("bad annotation", where, f"{relp} annotated twice"))
                continue
            used.add(relp)
            labels = {}
            if rec.get("gender") not in (None, ""):
                labels["gender"] = str(rec["gender"]).strip()
                genders.add(labels["gender"])
            key = keys(str(Path(relp).with_suffix("")).replace("/", "_"))
            scan.items.append(Item(key=key, identity=str(ident), labels=labels, meta={"path": relp},
                                   payload={"path": str(images / relp)}, origin=f"images/{relp}"))
        if not scan.items:
            raise InputError(f"{ann}: no usable records" + (f" (first fault: {scan.faults[0]})" if scan.faults
                                                            else ""))
        missing_gender = sum(1 for it in scan.items if "gender" not in it.labels)
        if genders and missing_gender:
            for it in scan.items:
                if "gender" not in it.labels:
                    scan.faults.append(Fault("bad annotation", it.origin, "no gender (others have one)"))
            scan.items = [it for it in scan.items if "gender" in it.labels]
        if genders:
            scan.schemas["gender"] = (sorted(genders, key=int) if all(g.lstrip("-").isdigit() for g in genders)
                                      else sorted(genders))
        unannotated = 0
        for dirpath, _, files in os.walk(images):
            for fn in files:
                if fn.lower().endswith(IMAGE_SUFFIXES):
                    r = (Path(dirpath) / fn).relative_to(images).as_posix()
                    unannotated += r not in used
        if unannotated:
            scan.ignored.append(f"{unannotated} image(s) in images/ without an annotation")
        ext = choose_image_ext([it.payload["path"] for it in scan.items])
        scan.notes = {"image_ext": ext}
        scan.loader = FacecomLoader(ext)
        return scan


SOURCE = FacecomSource()
