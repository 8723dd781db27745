"""``ear``: ear images with bounding boxes from a metadata ``.npy``.

::

    --input META.npy   a pickled dict {'image_paths': [...], 'bboxes': [[x1, y1, x2, y2], ...]}
                       (optional 'identities' or 'labels': one identity per image)
    --root DIR         what the image paths are relative to (default: META's folder)
    --buffer 0.1       grow each box by this fraction of its width/height on every side

The metadata file is a pickled object array (``np.load(allow_pickle=True)``):
only pack metadata you trust. Images are stored whole (``image.<ext>``,
original bytes when they share a format) and the box with them, so the crop
happens at read time (:func:`crop`, for recipes) and the buffer can change
without repacking (``bbox_raw`` is kept):

* ``json``: ``bbox`` = the buffered box clipped to the image, integer pixels
  ``[x1, y1, x2, y2]`` (x2/y2 exclusive, PIL ``crop`` order); ``bbox_raw`` (as
  given); ``buffer``; ``path``; ``identity`` when known.
* Identity (``--identity``): ``auto`` uses the dict's ``identities``/``labels``
  if present, else the image's parent folder name when the images are in more
  than one folder, else none (then only ``--split-by sample`` works);
  ``parent`` / ``none`` force it.
* A box that is not 4 finite numbers with x1 < x2, y1 < y2 is a fault ("bad
  box"); one that does not overlap the image at all is "box outside image"; a
  box partly outside is clipped (``bbox_clipped: true``).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import numpy as np

from . import (Fault, InputError, Item, KeyMaker, SampleError, Scan, Source, choose_image_ext, read_image,
               require_dir, require_file)


def buffered_box(box, width: int, height: int, buffer: float) -> tuple[list[int], bool]:
    """Grow ``box`` by ``buffer`` x its size per side, clip to the image, round outwards.
    Returns (box, clipped); raises SampleError when it misses the image entirely."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x1 < width and y1 < height and x2 > 0 and y2 > 0):
        raise SampleError("box outside image", f"box {[x1, y1, x2, y2]} vs image {width}x{height}")
    clipped = x1 < 0 or y1 < 0 or x2 > width or y2 > height
    bw, bh = x2 - x1, y2 - y1
    x1, y1, x2, y2 = x1 - buffer * bw, y1 - buffer * bh, x2 + buffer * bw, y2 + buffer * bh
    out = [max(0, int(math.floor(x1))), max(0, int(math.floor(y1))),
           min(width, int(math.ceil(x2))), min(height, int(math.ceil(y2)))]
    if out[2] <= out[0] or out[3] <= out[1]:
        raise SampleError("box outside image", f"box {box} vs image {width}x{height}")
    return out, clipped


def crop(sample: Mapping[str, Any], field: str | None = None, box_key: str = "bbox"):
    """The ear crop of a decoded shard sample: ``sample[image field].crop(json[box_key])``.
    ``field`` defaults to the sample's first ``image.*`` entry."""
    if field is None:
        field = next((k for k in sample if k.startswith("image.")), None)
        if field is None:
            raise KeyError(f"sample {sample.get('__key__')!r} has no image.* field")
    box = sample["json"][box_key]
    return sample[field].crop(tuple(int(v) for v in box))


def crop_with_buffer(sample: Mapping[str, Any], buffer: float, field: str | None = None):
    """Crop with another buffer than the one packed (from ``bbox_raw``)."""
    if field is None:
        field = next(k for k in sample if k.startswith("image."))
    img = sample[field]
    box, _ = buffered_box(sample["json"]["bbox_raw"], img.size[0], img.size[1], buffer)
    return img.crop(tuple(box))


class EarLoader:
    def __init__(self, ext: str, buffer: float):
        self.ext, self.buffer = ext, buffer

    def __call__(self, item: Item) -> dict[str, Any]:
        f, img = read_image(item.payload["path"], self.ext)
        box, clipped = buffered_box(item.payload["bbox"], img.size[0], img.size[1], self.buffer)
        extra = {"bbox": box, "bbox_raw": [float(v) for v in item.payload["bbox"]], "buffer": self.buffer}
        if clipped:
            extra["bbox_clipped"] = True
        return {f"image.{self.ext}": f, "json": extra}


class EarSource(Source):
    name = "ear"
    help = "ear metadata .npy {'image_paths', 'bboxes'} [--root DIR] [--buffer 0.1]"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("ear options")
        g.add_argument("--root", type=Path, help="ear: folder the image paths are relative to (default: "
                                                 "the metadata file's folder)")
        g.add_argument("--buffer", type=float, default=0.1, help="ear: box growth per side (default 0.1 = 10%%)")
        g.add_argument("--identity", choices=["auto", "parent", "none"], default="auto",
                       help="ear: where identities come from (default auto)")

    def scan(self, input_path: Path | None, args: argparse.Namespace) -> Scan:
        meta_path = require_file(input_path, "--input")
        root = require_dir(getattr(args, "root", None) or meta_path.parent, "--root")
        buffer = float(getattr(args, "buffer", 0.1))
        if not (0.0 <= buffer <= 5.0):
            raise InputError(f"--buffer: must be in [0, 5], got {buffer}")
        try:
            obj = np.load(meta_path, allow_pickle=True)
            meta = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object and obj.ndim == 0 else obj
        except Exception as e:
            raise InputError(f"--input {meta_path}: not a readable .npy ({type(e).__name__}: {e})") from None
        if not isinstance(meta, dict) or not {"image_paths", "bboxes"} <= set(meta):
            raise InputError(f"--input {meta_path}: expected a dict with 'image_paths' and 'bboxes'")
        paths, boxes = list(meta["image_paths"]), list(np.asarray(meta["bboxes"], dtype=object))
        if len(paths) != len(boxes):
            raise InputError(f"--input {meta_path}: {len(paths)} image_paths but {len(boxes)} bboxes")
        if not paths:
            raise InputError(f"--input {meta_path}: no images")
        ids_given = next((meta[k] for k in ("identities", "labels") if k in meta), None)
        if ids_given is not None and len(ids_given) != len(paths):
            raise InputError(f"--input {meta_path}: {len(ids_given)} identities for {len(paths)} images")
        mode = getattr(args, "identity", "auto")
        parents = {PurePosixPath(str(p).replace("\\", "/")).parent.as_posix() for p in paths}
        if mode == "auto":
            mode = "given" if ids_given is not None else ("parent" if len(parents) > 1 else "none")
        scan = Scan(items=[])
        keys = KeyMaker()
        for i, (p, box) in enumerate(zip(paths, boxes)):
            sp = str(p).replace("\\", "/")
            where = f"[{i}] {sp}"
            try:
                b = [float(v) for v in np.asarray(box, dtype=np.float64).reshape(-1)]
            except (TypeError, ValueError):
                b = []
            if len(b) != 4 or not all(math.isfinite(v) for v in b) or not (b[0] < b[2] and b[1] < b[3]):
                scan.faults.append(Fault("bad box", where, f"expected [x1, y1, x2, y2] with x1<x2, y1<y2, got "
                                                           f"{np.asarray(box).tolist()!r}"[:200]))
                continue
            pp = PurePosixPath(sp)
            full = Path(sp) if pp.is_absolute() else root / sp
            ident = (str(ids_given[i]) if mode == "given" else pp.parent.name or None if mode == "parent" else None)
            key = keys(pp.with_suffix("").as_posix().replace("/", "_"))
            scan.items.append(Item(key=key, identity=ident, meta={"path": sp},
                                   payload={"path": str(full), "bbox": b}, origin=sp))
        if not scan.items:
            raise InputError(f"--input {meta_path}: no usable entries (first fault: {scan.faults[0]})")
        ext = choose_image_ext([it.payload["path"] for it in scan.items])
        scan.notes = {"buffer": buffer, "identity": mode, "root": str(root), "image_ext": ext}
        scan.loader = EarLoader(ext, buffer)
        return scan


SOURCE = EarSource()
