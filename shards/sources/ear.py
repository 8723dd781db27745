"""``ear``: ear images with bounding boxes from a metadata file (``.npy``, ``.json`` or ``.csv``),
or a folder with one sub-folder of images per subject and no boxes (the AMI Ear Database).

::

    --input DIR        ROOT/<subject>/*.{jpg,png,...} (the ``folder`` layout): every image is an
                       ear crop already, its box is the whole image (``bbox_raw`` = [0, 0, W, H]);
                       identity = the sub-folder
    --input META       the metadata, one of (told apart by content, then suffix):
      META.npy   a dict {'image_paths': [...], 'bboxes': [[x1, y1, x2, y2], ...]} saved with
                 np.save (optional 'identities' or 'labels': one identity per image); or an
                 object array of records {'image_path', 'bbox', 'identity'}; or a structured
                 array with fields image_path, x1, y1, x2, y2 (or bbox) [, identity]
      META.json  the same dict, or a list of records
                 [{"image_path": "a/1.jpg", "bbox": [x1, y1, x2, y2], "identity": "a"}, ...]
      META.csv   header image_path,x1,y1,x2,y2[,identity] (case-insensitive), or a single
                 bbox column holding "x1 y1 x2 y2" (or "[x1, y1, x2, y2]") instead of x1..y2
    --root DIR         what the image paths are relative to (default: META's folder)
    --buffer 0.1       grow each box by this fraction of its width/height on every side
    --identity auto|parent|none   where identities come from (see below)
    --val-input META2  a second metadata file (same formats) whose images are the ``val``
                       split, --input's the ``train`` split (the original's
                       ``train_teacher.npy`` / ``val_teacher.npy``); ``--splits`` is then not used

Record field aliases: image path ``image_path``/``path``/``image``/``file``;
box ``bbox``/``box``; identity ``identity``/``label``. A record without an
image path (or, when other records have one, without an identity) is a fault
("bad metadata row").

Untrusted metadata is safe to pack: a ``.npy`` is never unpickled with
pickle's defaults. Numeric/structured arrays are read with
``np.load(allow_pickle=False)``; an object array (what ``np.save`` writes for
a dict) goes through :class:`SafeUnpickler`, which only builds dicts, lists,
tuples, strings, bytes, numbers, booleans, None and NumPy arrays, dtypes and
scalars. Any other global in the pickle (``os.system``, ``builtins.eval``, a
class, ...) stops ``create`` with a one-line error naming the file and the
refused global, before it is called. FIFOs, sockets and devices are never
opened (as metadata: a one-line error; as an image: a "not a regular file"
fault).

Images are stored whole (``image.<ext>``, original bytes when they share a
format) and the box with them, so the crop happens at read time
(the ``ear_teacher`` recipe's ``ear_crop``) and the buffer can change without repacking
(``bbox_raw`` is kept):

* ``json``: ``bbox`` = the buffered box clipped to the image, integer pixels
  ``[x1, y1, x2, y2]`` (x2/y2 exclusive, PIL ``crop`` order); ``bbox_raw`` (as
  given); ``buffer``; ``path``; ``identity`` when known.
* Identity (``--identity``): ``auto`` uses the metadata's identities
  (``identities``/``labels`` in the dict, the records' ``identity``, the CSV's
  ``identity`` column) if present, else the image's parent folder name when the
  images are in more than one folder, else none (then only ``--split-by
  sample`` works); ``parent`` / ``none`` force it.
* A box that is not 4 finite numbers with x1 < x2, y1 < y2 is a fault ("bad
  box"); one that does not overlap the image at all is "box outside image"; a
  box partly outside is clipped (``bbox_clipped: true``).
* An image path that leads outside ``--root`` (absolute elsewhere, ``..``, or
  a symlink resolving outside) refuses the input in one line, before anything
  is read or written (:func:`shards.sources.inside_input`, the rule of every
  source): the metadata is untrusted.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import numpy as np

from . import (Fault, InputError, Item, KeyMaker, NotRegularFile, SampleError, Scan, Source, choose_image_ext,
               inside_input, lower_header, npy_header, open_regular, read_image, require_dir, require_file)

IMAGE_KEYS = ("image_path", "path", "image", "file")
BOX_KEYS = ("bbox", "box")
IDENTITY_KEYS = ("identity", "label")
NPY_MAGIC = b"\x93NUMPY"


# ---------------------------------------------------------------------------
# reading the metadata without running anything from it
# ---------------------------------------------------------------------------
class RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"refused global {module}.{name}")
        self.module, self.name = module, name


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The pickle globals a NumPy object array of plain data needs (NumPy 1.x and 2.x
    spellings), all C-level (immutable) callables: array and scalar reconstruction,
    ``ndarray``, ``dtype``, and ``complex`` for complex numbers."""
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            multiarray = importlib.import_module(mod)
            break
        except ImportError:
            continue
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           ("builtins", "complex"): complex, ("__builtin__", "complex"): complex}
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """Unpickles plain data only: dicts, lists, tuples, sets, strings, bytes, numbers,
    None/bools (pickle encodes those without globals) and NumPy arrays/dtypes/scalars
    (the globals of :func:`_allowed_globals`). Every other global (functions, classes,
    ``copyreg`` extensions, persistent ids) raises before anything is called."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if SafeUnpickler._allowed is None:
            SafeUnpickler._allowed = _allowed_globals()
        obj = SafeUnpickler._allowed.get((module, name))
        if obj is None:
            raise RefusedGlobal(module, name)
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".strip(": ")


def load_npy_safely(path: Path, f) -> Any:
    """The array in the ``.npy`` open at ``f`` (at its start): object arrays via
    :class:`SafeUnpickler`, others with ``np.load(allow_pickle=False)``. A 0-d object
    array yields its element (the dict ``np.save`` was given)."""
    where = f"--input {path}"
    try:
        shape, fortran, dtype = npy_header(f)
    except Exception as e:
        raise InputError(f"{where}: not a readable .npy ({_first_line(e)})") from None
    if not dtype.hasobject:
        f.seek(0)
        try:
            return np.load(f, allow_pickle=False)
        except Exception as e:
            raise InputError(f"{where}: not a readable .npy ({_first_line(e)})") from None
    try:
        arr = SafeUnpickler(f).load()
    except RefusedGlobal as e:
        raise InputError(f"{where}: refused to unpickle {ascii(e.module + '.' + e.name)}: ear metadata may only "
                         "hold dicts, lists, tuples, strings, numbers and NumPy arrays (nothing was run)") from None
    except Exception as e:
        raise InputError(f"{where}: not a readable .npy object array ({_first_line(e)})") from None
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{where}: the pickle holds a {type(arr).__name__}, not the array its header announces")
    if arr.ndim == 0 and arr.dtype == object:
        return arr.item()
    return arr


@dataclass
class Entry:
    where: str
    path: Any
    box: Any
    identity: Any = None


def _text(v: Any) -> str:
    if isinstance(v, (bytes, np.bytes_)):
        return bytes(v).decode("utf-8", "replace")
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
    return str(v)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, (str, bytes, np.str_, np.bytes_)) and not str(_text(v)).strip())


def _pick(rec: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        if k in rec and not _missing(rec[k]):
            return rec[k]
    return None


def _entries_from_dict(meta: Mapping[str, Any], path: Path) -> tuple[list[Entry], bool]:
    """The ``{'image_paths', 'bboxes'[, 'identities'|'labels']}`` form."""
    where = f"--input {path}"
    try:
        paths = list(meta["image_paths"])
        boxes = list(np.asarray(meta["bboxes"], dtype=object)) if not isinstance(meta["bboxes"], list) \
            else list(meta["bboxes"])
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: 'image_paths' and 'bboxes' must be lists ({_first_line(e)})") from None
    if len(paths) != len(boxes):
        raise InputError(f"{where}: {len(paths)} image_paths but {len(boxes)} bboxes")
    ids = next((meta[k] for k in ("identities", "labels") if k in meta), None)
    if ids is not None:
        try:
            ids = list(ids)
        except TypeError:
            raise InputError(f"{where}: 'identities' must be a list") from None
        if len(ids) != len(paths):
            raise InputError(f"{where}: {len(ids)} identities for {len(paths)} images")
    return [Entry(f"[{i}] {_text(p)}", p, b, ids[i] if ids is not None else None)
            for i, (p, b) in enumerate(zip(paths, boxes))], ids is not None


def _entry_from_record(rec: Mapping[str, Any], where: str) -> Entry:
    rec = {str(k).strip().lower(): v for k, v in rec.items()}
    box = _pick(rec, BOX_KEYS)
    if box is None and all(k in rec for k in ("x1", "y1", "x2", "y2")):
        box = [rec[k] for k in ("x1", "y1", "x2", "y2")]
    img = _pick(rec, IMAGE_KEYS)
    return Entry(f"{where} {_text(img)}" if img is not None else where, img, box, _pick(rec, IDENTITY_KEYS))


def _entries_from_records(records: list[Any], faults: list[Fault], label=lambda i: f"[{i}]") -> list[Entry]:
    out = []
    for i, rec in enumerate(records):
        if isinstance(rec, np.void) and rec.dtype.names:  # a structured array's row
            rec = {n: rec[n] for n in rec.dtype.names}
        if not isinstance(rec, Mapping):
            faults.append(Fault("bad metadata row", label(i), f"not a record: {rec!r}"[:200]))
            continue
        out.append(_entry_from_record(rec, label(i)))
    return out


def _entries_from_csv(path: Path, faults: list[Fault]) -> list[Entry]:
    try:
        with open_regular(path, "r", newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [str(h).strip().lower() for h in (reader.fieldnames or [])]
            has_box = any(k in header for k in BOX_KEYS) or {"x1", "y1", "x2", "y2"} <= set(header)
            if not any(k in header for k in IMAGE_KEYS) or not has_box:
                raise InputError(f"--input {path}: CSV needs columns image_path and x1,y1,x2,y2 (or bbox); has "
                                 f"{','.join(header) or 'no header'}"[:300])
            out = []
            for line, row in enumerate(reader, start=2):
                where = f"{path.name}:{line}"
                if None in row:
                    faults.append(Fault("bad metadata row", where, "more values than columns"))
                    continue
                out.append(_entry_from_record(lower_header(row), where))
            return out
    except NotRegularFile as e:
        raise InputError(f"--input {e}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"--input {path}: unreadable CSV ({_first_line(e)})") from None


def read_metadata(path: Path) -> tuple[list[Entry], bool, list[Fault], str]:
    """(entries, identities given?, faults, format) from a ``.npy``, ``.json`` or ``.csv``."""
    where = f"--input {path}"
    faults: list[Fault] = []
    try:
        with open_regular(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
            if head == NPY_MAGIC:
                f.seek(0)
                meta, fmt = load_npy_safely(path, f), "npy"
            else:
                fmt = None
    except NotRegularFile as e:
        raise InputError(f"--input {e}") from None
    except OSError as e:
        raise InputError(f"{where}: unreadable ({_first_line(e)})") from None
    if fmt is None:
        suffix = path.suffix.lower()
        if suffix == ".npy":
            raise InputError(f"{where}: not a .npy file (no NumPy magic)")
        if suffix == ".json" or (suffix != ".csv" and head.lstrip()[:1] in (b"[", b"{")):
            fmt = "json"
            try:
                with open_regular(path, "r", encoding="utf-8-sig") as f:
                    meta = json.loads(f.read())
            except NotRegularFile as e:
                raise InputError(f"--input {e}") from None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InputError(f"{where}: not readable JSON ({_first_line(e)})") from None
        else:
            entries = _entries_from_csv(path, faults)
            return entries, any(e.identity is not None for e in entries), faults, "csv"
    if isinstance(meta, Mapping):
        if not {"image_paths", "bboxes"} <= set(meta):
            raise InputError(f"{where}: expected a dict with 'image_paths' and 'bboxes', or a list of records")
        entries, given = _entries_from_dict(meta, path)
        return entries, given, faults, fmt
    if isinstance(meta, np.ndarray) and meta.dtype.names:  # structured array
        entries = _entries_from_records(list(meta.reshape(-1)), faults)
    elif isinstance(meta, (list, tuple)) or (isinstance(meta, np.ndarray) and meta.dtype == object):
        entries = _entries_from_records(list(np.asarray(meta, dtype=object).reshape(-1))
                                        if isinstance(meta, np.ndarray) else list(meta), faults)
    else:
        got = f"a {meta.dtype} array of shape {meta.shape}" if isinstance(meta, np.ndarray) else type(meta).__name__
        raise InputError(f"{where}: expected a dict with 'image_paths' and 'bboxes', or a list of records; got {got}")
    return entries, any(e.identity is not None for e in entries), faults, fmt


_SPLIT = re.compile(r"[\s,;]+")


def parse_box(box: Any) -> list[float]:
    """4 floats from a list/array, or from a string ``"x1 y1 x2 y2"`` / ``"[x1, y1, x2, y2]"``;
    [] when that fails."""
    try:
        if isinstance(box, (str, np.str_)):
            box = [t for t in _SPLIT.split(str(box).strip().strip("[]()")) if t]
        return [float(v) for v in np.asarray(box, dtype=np.float64).reshape(-1)]
    except (TypeError, ValueError):
        return []


def _show(box: Any) -> str:
    try:
        return repr(np.asarray(box).tolist())
    except Exception:
        return repr(box)


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


class EarLoader:
    def __init__(self, ext: str, buffer: float):
        self.ext, self.buffer = ext, buffer

    def __call__(self, item: Item) -> dict[str, Any]:
        f, img = read_image(item.payload["path"], self.ext)
        raw = item.payload.get("bbox") or [0.0, 0.0, float(img.size[0]), float(img.size[1])]  # None: whole image
        box, clipped = buffered_box(raw, img.size[0], img.size[1], self.buffer)
        extra = {"bbox": box, "bbox_raw": [float(v) for v in raw], "buffer": self.buffer}
        if clipped:
            extra["bbox_clipped"] = True
        return {f"image.{self.ext}": f, "json": extra}


class EarSource(Source):
    name = "ear"
    help = ("ROOT/<subject>/*.jpg (no boxes: whole image), or ear metadata: .npy (dict "
            "{'image_paths', 'bboxes'[, 'identities']} or records; never unpickles code), "
            ".json (same dict or [{image_path, bbox, identity}]) or .csv (image_path,x1,y1,x2,y2[,identity]) "
            "[--root DIR] [--buffer 0.1] [--identity auto|parent|none]")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("ear options", "--input is the metadata file: .npy (a dict "
                                      "{'image_paths', 'bboxes'[, 'identities']} or records; object arrays are "
                                      "read with a restricted unpickler that only builds plain data), .json (the "
                                      "same dict or a list of {image_path, bbox, identity} records) or .csv "
                                      "(columns image_path,x1,y1,x2,y2[,identity])")
        g.add_argument("--root", type=Path, help="ear: folder the image paths are relative to (default: "
                                                 "the metadata file's folder)")
        g.add_argument("--buffer", type=float, default=0.1, help="ear: box growth per side (default 0.1 = 10%%)")
        g.add_argument("--val-input", type=Path, default=None,
                       help="ear: a second metadata file whose images are the val split (the original's "
                            "train_teacher.npy + val_teacher.npy); --input is then the train split and "
                            "--splits is not used")
        g.add_argument("--identity", choices=["auto", "parent", "none"], default="auto",
                       help="ear: where identities come from: auto = the metadata's identities, else the "
                            "images' parent folders (default auto)")

    def other_inputs(self, args: argparse.Namespace) -> list[Path]:
        val = getattr(args, "val_input", None)
        return [Path(val)] if val is not None else []

    def scan(self, input_path: Path | None, args: argparse.Namespace) -> Scan:
        buffer = float(getattr(args, "buffer", 0.1))
        if not (0.0 <= buffer <= 5.0):
            raise InputError(f"--buffer: must be in [0, 5], got {buffer}")
        val_input = getattr(args, "val_input", None)
        if input_path is not None and input_path.is_dir():
            if val_input is not None:
                raise InputError("--val-input is for a metadata --input (train_teacher.npy + val_teacher.npy); "
                                 "a folder --input is split by --splits")
            return self._scan_subject_folders(input_path, args, buffer)
        scan = Scan(items=[], faults=[])
        parts = [("train", input_path, "--input")] + ([("val", Path(val_input), "--val-input")] if val_input else [])
        read = []  # (split, metadata file, root, entries)
        ids_given, parents = [], set()
        for split, path, flag in parts:
            meta_path = require_file(path, flag)
            root = require_dir(getattr(args, "root", None) or meta_path.parent, "--root")
            entries, given, faults, meta_format = read_metadata(meta_path)
            scan.faults += faults
            if not entries:
                raise InputError(f"{flag} {meta_path}: no images" + (f" (first fault: {faults[0]})" if faults else ""))
            read.append((split, meta_path, root, entries))
            ids_given.append(given)
            parents |= {PurePosixPath(_text(e.path).replace("\\", "/")).parent.as_posix() for e in entries
                        if e.path is not None}
        mode = getattr(args, "identity", "auto")
        if mode == "auto":  # one rule for both files
            mode = "given" if any(ids_given) else ("parent" if len(parents) > 1 else "none")
        keys = KeyMaker()
        for split, meta_path, root, entries in read:
            items = self._items(meta_path, root, entries, mode, keys, scan.faults)
            scan.items += items
            if val_input:  # the original's separate train / val files keep their split
                scan.splits.update({it.key: split for it in items})
        ext = choose_image_ext([it.payload["path"] for it in scan.items])
        roots = sorted({str(r) for _, _, r, _ in read})
        scan.notes = {"buffer": buffer, "identity": mode, "root": roots[0] if len(roots) == 1 else roots,
                      "image_ext": ext, "metadata_format": meta_format,
                      "splits_from": "--input / --val-input" if val_input else "drawn"}
        scan.loader = EarLoader(ext, buffer)
        return scan

    @staticmethod
    def _items(meta_path: Path, root: Path, entries: list, mode: str, keys: KeyMaker,
               faults: list[Fault]) -> list[Item]:
        """The items of one metadata file's entries (faults appended)."""
        items = []
        for e in entries:
            if e.path is None:
                faults.append(Fault("bad metadata row", e.where, f"no image path ({'/'.join(IMAGE_KEYS)})"))
                continue
            if mode == "given" and e.identity is None:
                faults.append(Fault("bad metadata row", e.where, "no identity (others have one)"))
                continue
            sp = _text(e.path).replace("\\", "/")
            b = parse_box(e.box)
            if len(b) != 4 or not all(math.isfinite(v) for v in b) or not (b[0] < b[2] and b[1] < b[3]):
                faults.append(Fault("bad box", e.where, f"expected [x1, y1, x2, y2] with x1<x2, y1<y2, got "
                                                        f"{_show(e.box)}"[:200]))
                continue
            pp = PurePosixPath(sp)
            full = Path(sp) if pp.is_absolute() else root / sp
            inside_input(full, root, e.where)
            ident = (_text(e.identity) if mode == "given" else pp.parent.name or None if mode == "parent" else None)
            key = keys(pp.with_suffix("").as_posix().replace("/", "_"))
            items.append(Item(key=key, identity=ident, meta={"path": sp},
                              payload={"path": str(full), "bbox": b}, origin=sp))
        if not items:
            raise InputError(f"{meta_path}: no usable entries" + (f" (first fault: {faults[0]})" if faults else ""))
        return items

    def _scan_subject_folders(self, root: Path, args: argparse.Namespace, buffer: float) -> Scan:
        """ROOT/<subject>/*.jpg without boxes: the ``folder`` source's scan, whole-image boxes."""
        from .folder import SOURCE as FOLDER

        if getattr(args, "root", None) is not None:
            raise InputError("--root is for a metadata --input; a folder --input is its own root")
        scan = FOLDER.scan(root, argparse.Namespace())
        ext = scan.notes["image_ext"]
        for item in scan.items:
            item.payload["bbox"] = None
        scan.notes = {**scan.notes, "buffer": buffer, "identity": "parent", "root": str(root), "image_ext": ext,
                      "metadata_format": "folders (whole image = box)"}
        scan.loader = EarLoader(ext, buffer)
        return scan


SOURCE = EarSource()
