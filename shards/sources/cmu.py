"""``cmu``: the CMU Face Images layout (``../shared/data/cmu_faces``).

::

    ROOT/<id>/<id>_<pose>_<expression>_<eyes>[_<scale>].pgm
      pose: straight|left|right|up   expression: neutral|happy|sad|angry
      eyes: open|sunglasses          scale: none = 128x120, _2 = 64x60, _4 = 32x30

``--scale 1|2|4`` picks the resolution (default 2: the largest complete one;
in the shared copy only 313 of 624 full-size images exist). The full-size
files are ASCII PGM (``P2``) and the ``_2``/``_4`` ones binary PGM with
maxval 156: Pillow decodes both slowly (Python loops) and scales to 0..255, so
they are stored as lossless PNG of the decoded pixels (``image.png``; a
binary PGM with maxval 255 would be kept as-is).

Labels (``json``): ``identity``, ``pose``, ``expression``, ``sunglasses``
(``open``/``sunglasses``), plus ``path``. Keys: the file stem without the
scale suffix, e.g. ``an2i_left_angry_open``. Folders starting with ``_`` or
``.`` (the known-glitched ``_bad/``) and other files are ignored and listed
in the report; a ``.pgm`` whose name does not parse, or whose ``<id>``
differs from its folder, is a fault ("bad file name").
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

from . import (Fault, InputError, Item, KeyMaker, Scan, Source, choose_image_ext, inside_input, natural_key,
               read_image, require_dir)

POSES = ["straight", "left", "right", "up"]
EXPRESSIONS = ["neutral", "happy", "sad", "angry"]
EYES = ["open", "sunglasses"]
_NAME = re.compile(r"^(?P<id>[^_]+)_(?P<pose>[a-z]+)_(?P<expr>[a-z]+)_(?P<eyes>[a-z]+)(?:_(?P<scale>\d+))?$")


class CmuLoader:
    def __init__(self, ext: str):
        self.ext = ext

    def __call__(self, item: Item) -> dict[str, Any]:
        f, _ = read_image(item.payload["path"], self.ext)
        return {f"image.{self.ext}": f}


class CmuSource(Source):
    name = "cmu"
    help = "CMU faces: ROOT/<id>/<id>_<pose>_<expression>_<eyes>[_<scale>].pgm [--scale 1|2|4]"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("cmu options")
        g.add_argument("--scale", type=int, choices=[1, 2, 4], default=2,
                       help="cmu: 1 = 128x120 (ASCII PGM, incomplete), 2 = 64x60, 4 = 32x30 (default 2)")

    def scan(self, input_path: Path | None, args: argparse.Namespace) -> Scan:
        root = require_dir(input_path)
        want = int(getattr(args, "scale", 2) or 2)
        scan = Scan(items=[], schemas={"pose": POSES, "expression": EXPRESSIONS, "sunglasses": EYES})
        keys = KeyMaker()
        paths = []
        other_scale = other_files = 0
        dirs = [Path(e.path) for e in sorted(os.scandir(root), key=lambda e: natural_key(e.name)) if e.is_dir()]
        for d in dirs:
            if d.name.startswith(("_", ".")):
                n = sum(1 for p in d.rglob("*") if p.is_file())
                scan.ignored.append(f"{d.name}/: folder starting with '{d.name[0]}' ({n} files, e.g. known-glitched)")
                continue
            for p in sorted(d.iterdir(), key=lambda p: natural_key(p.name)):
                if not p.is_file() or p.suffix.lower() != ".pgm":
                    other_files += 1
                    continue
                relp = f"{d.name}/{p.name}"
                m = _NAME.match(p.stem)
                if not m or m["pose"] not in POSES or m["expr"] not in EXPRESSIONS or m["eyes"] not in EYES:
                    scan.faults.append(Fault("bad file name", relp, "expected <id>_<pose>_<expression>_<eyes>"
                                                                    "[_<scale>].pgm"))
                    continue
                if m["id"] != d.name:
                    scan.faults.append(Fault("bad file name", relp, f"identity {m['id']!r} in folder {d.name!r}"))
                    continue
                scale = int(m["scale"] or 1)
                if scale not in (1, 2, 4):
                    scan.faults.append(Fault("bad file name", relp, f"unknown scale {scale}"))
                    continue
                if scale != want:
                    other_scale += 1
                    continue
                inside_input(p, root, relp)  # a symlinked file or identity folder stays inside
                key = keys(f"{m['id']}_{m['pose']}_{m['expr']}_{m['eyes']}")
                scan.items.append(Item(key=key, identity=d.name,
                                       labels={"pose": m["pose"], "expression": m["expr"], "sunglasses": m["eyes"]},
                                       meta={"path": relp}, payload={"path": str(p)}, origin=relp))
                paths.append(p)
        if other_files:
            scan.ignored.append(f"{other_files} file(s) that are not .pgm")
        if not scan.items:
            raise InputError(f"--input {root}: no CMU face images at scale {want} "
                             "(expected ROOT/<id>/<id>_<pose>_<expression>_<eyes>[_<scale>].pgm)")
        ext = choose_image_ext(paths)
        scan.notes = {"scale": want, "image_ext": ext, "other_scale_files": other_scale}
        scan.loader = CmuLoader(ext)
        return scan


SOURCE = CmuSource()
