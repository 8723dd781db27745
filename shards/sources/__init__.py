"""Readers of raw dataset layouts (one module per format) for ``biomtl shards create``.

A source turns an input path into a :class:`Scan`: the list of samples it
found (:class:`Item`: sample key, identity name, categorical labels by class
name, other metadata, and what its loader needs), the faults met while
scanning (bad CSV rows, missing files, unknown twin identities ...), things
ignored by design (e.g. CMU's ``_bad/`` folder), twin pairs and evaluation
pairs. ``scan.loader`` is a picklable callable that reads one item (in a
worker process) and returns ``{extension: Field | dict}``; a problem with the
item's data raises :class:`SampleError`, which ``create`` reports and skips
(or turns into a failure with ``--strict``).

Conventions every source follows:

* sample keys contain no dots, no ``/``, no whitespace and do not start with
  ``_`` (:func:`make_key` sanitises and deduplicates);
* images are stored as their original bytes when every image of a field has
  the same storable format (JPEG, PNG, binary PGM/PPM with maxval 255, GIF,
  BMP), else as lossless PNG of the decoded pixels (:func:`choose_image_ext`,
  :func:`read_image`). ASCII PNM (``P1``-``P4``, e.g. the full-size CMU faces)
  and binary PGM/PPM with another maxval (the CMU ``_2``/``_4`` files have
  maxval 156, which Pillow decodes pixel by pixel in Python, ~7 ms for 64x60)
  are always converted (Pillow scales maxval to 255; the map is one-to-one);
* arrays are ``.npy`` (no pickle), labels go into the sample's ``json``;
* untrusted input: no source unpickles or evaluates input data (no
  ``pickle.load``, ``torch.load``, ``eval``; ``.npy`` arrays are read with
  ``allow_pickle=False``; the ear metadata's object arrays go through a
  restricted unpickler that builds plain data only); a file the input names or
  holds (CSV value, annotation, metadata path, a symlink in the tree) is read only
  when it resolves inside the input: :func:`inside_input`, the one rule every
  source calls, refuses the input in one line otherwise; and every file is opened with
  :func:`open_regular`, which refuses FIFOs, sockets and devices without
  blocking on them (a fault "not a regular file", like an unreadable file).

Formats: ``folder``, ``cmu``, ``thz``, ``photometric``, ``ear``, ``facecom``,
``recordio``, ``synthetic`` (see each module's docstring).
"""
from __future__ import annotations

import argparse
import importlib
import io
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

SOURCES: dict[str, str] = {
    "folder": "shards.sources.folder",
    "cmu": "shards.sources.cmu",
    "thz": "shards.sources.thz",
    "photometric": "shards.sources.photometric",
    "ear": "shards.sources.ear",
    "facecom": "shards.sources.facecom",
    "recordio": "shards.sources.recordio",
    "synthetic": "shards.sources.synthetic",
}

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".gif", ".bmp", ".tif", ".tiff", ".webp")
STORABLE = ("jpg", "png", "pgm", "ppm", "gif", "bmp")  # kept as original bytes


class InputError(ValueError):
    """The input as a whole is unusable (missing path, wrong layout): a one-line error, exit 2."""


class SampleError(Exception):
    """One sample's data are bad (``kind``: "missing file", "undecodable image", ...)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass
class Fault:
    kind: str  # "missing file", "undecodable image", "bad csv row", "box outside image", ...
    where: str  # file (relative to the input where possible) or "file.csv:line"
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "where": self.where, "detail": self.detail}

    def __str__(self) -> str:
        return f"{self.kind}: {self.where}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class Item:
    key: str
    identity: str | None  # identity name (None: unlabelled)
    labels: dict[str, str] = field(default_factory=dict)  # categorical label -> class name
    meta: dict[str, Any] = field(default_factory=dict)  # other json values (plain data)
    payload: dict[str, Any] = field(default_factory=dict)  # what the loader reads
    origin: str = ""  # shown in reports


@dataclass
class Scan:
    items: list[Item]
    faults: list[Fault] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # skipped by design, with a reason
    schemas: dict[str, list[str]] = field(default_factory=dict)  # fixed class orders (others: sorted values)
    twin_pairs: list[tuple[str, str]] = field(default_factory=list)  # identity names
    pairs: list[tuple[str, str, int]] = field(default_factory=list)  # (key1, key2, label) protocol pairs
    notes: dict[str, Any] = field(default_factory=dict)  # goes into the manifest's created_with
    # key -> split name fixed by the input itself (folder: ROOT/{train,val,test}/<identity>/);
    # when set, every item has one and `shards create` keeps these splits instead of drawing them
    splits: dict[str, str] = field(default_factory=dict)
    loader: Callable[[Item], dict[str, Any]] | None = None  # picklable: reads one item in a worker


@dataclass
class Field:
    """One encoded tar member plus what the manifest statistics need."""

    data: bytes
    stats: tuple[np.ndarray, np.ndarray, int] | None = None  # per-channel sum, sum of squares, count
    size: tuple[int, int] | None = None  # (width, height) of images


# ---------------------------------------------------------------------------
# files: only regular files are ever opened
# ---------------------------------------------------------------------------
class NotRegularFile(OSError):
    """The path is a FIFO, socket, device or directory: never read (a FIFO would block forever)."""

    def __init__(self, path: Path | str, what: str):
        super().__init__(f"{path}: is a {what}, not a regular file")
        self.path, self.what = str(path), what


def file_type(mode: int) -> str:
    """``st_mode`` -> "regular file", "FIFO", "socket", "character device", ..."""
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def is_regular(path: Path | str) -> bool:
    """True for a regular file (symlinks followed); False for anything else, or when stat fails."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def open_regular(path: Path | str, mode: str = "rb", **kwargs: Any):
    """``open(path, mode)`` for reading, but only a regular file (symlinks followed).

    A FIFO, socket or device raises :class:`NotRegularFile` (an ``OSError``)
    without blocking: the type is checked before opening, the file is opened
    non-blocking and checked again on the descriptor (in case it was swapped
    in between)."""
    if any(c in mode for c in "wax+"):
        raise ValueError(f"open_regular is for reading, got mode {mode!r}")
    st = os.stat(path)  # FileNotFoundError etc. as from open()
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(path, file_type(st.st_mode))
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(path, file_type(st.st_mode))
        if getattr(os, "O_NONBLOCK", 0) and hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path | str) -> bytes:
    """The bytes of a regular file (see :func:`open_regular`)."""
    with open_regular(path, "rb") as f:
        return f.read()


def read_file_bytes(path: Path | str) -> bytes:
    """A sample's file, or :class:`SampleError` ("missing file", "not a regular file", "unreadable file")."""
    try:
        return read_regular(path)
    except FileNotFoundError:
        raise SampleError("missing file", str(path)) from None
    except NotRegularFile as e:
        raise SampleError("not a regular file", str(e)) from None
    except OSError as e:
        raise SampleError("unreadable file", f"{path}: {e}") from None


class Source:
    """Base class; a module's ``SOURCE`` is an instance."""

    name: str = ""
    help: str = ""
    needs_input: bool = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def scan(self, input_path: Path | None, args: argparse.Namespace) -> Scan:
        """Find the samples; the returned Scan's ``loader`` reads one of them."""
        raise NotImplementedError

    def other_inputs(self, args: argparse.Namespace) -> list[Path]:
        """Inputs besides ``--input`` named by this source's options (e.g. ear's
        ``--val-input``): the output may not be, be inside, or hold one either."""
        return []


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise InputError(f"unknown format {name!r} (known: {', '.join(SOURCES)})")
    return importlib.import_module(SOURCES[name]).SOURCE


# ---------------------------------------------------------------------------
# keys and names
# ---------------------------------------------------------------------------
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]+")


def sanitize(text: str) -> str:
    """A key fragment: runs of characters other than letters, digits, ``_``, ``-`` become ``-``."""
    s = _KEY_BAD.sub("-", str(text)).strip("-")
    return s or "x"


class KeyMaker:
    """Unique, valid sample keys from free-form parts (``a/b c.jpg`` -> ``a_b-c``)."""

    def __init__(self):
        self.used: set[str] = set()

    def __call__(self, *parts: str) -> str:
        base = "_".join(sanitize(p) for p in parts if str(p) != "")
        base = base.lstrip("_-") or "x"
        key, n = base, 1
        while key in self.used:
            n += 1
            key = f"{base}-{n}"
        self.used.add(key)
        return key


def natural_key(text: str) -> list[Any]:
    """Sort ``s2`` before ``s10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(text))]


def rel(path: Path | str, root: Path | None) -> str:
    p = Path(path)
    if root is not None:
        try:
            return p.relative_to(root).as_posix()
        except ValueError:
            pass
    return str(p)


def inside_input(path: Path | str, root: Path | str, named_by: str) -> Path:
    """``path`` when it is inside the dataset ``root``, else one :class:`InputError` line.

    The one rule for every file a source reads because the input names it (a
    CSV value, an annotation, a metadata path, ``dataset_infor.json``) or holds
    it (a tree walked for images, where a symlink may point anywhere): the path,
    symlinks followed, must resolve inside ``root``. An absolute path inside the
    root is fine; an absolute path elsewhere, a ``..`` that climbs out, or a
    symlink resolving out refuses the whole input, before anything is written:
    a dataset that names files elsewhere is not packed half (the user fixes the
    input or passes the right ``--input``). ``named_by`` says where the path came
    from (``train.csv:4``, ``annotations.json[3]``)."""
    p = Path(path)
    base = Path(root).resolve()
    try:
        target = p.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise InputError(f"{named_by}: {str(p)[:200]} cannot be resolved ({e}); not read") from None
    if target.is_relative_to(base):
        return p
    lexical = Path(os.path.normpath(os.path.abspath(p)))
    if not (lexical.is_relative_to(Path(os.path.normpath(os.path.abspath(root)))) or lexical.is_relative_to(base)):
        why = "climbs out with '..'" if ".." in p.parts else "is an absolute path"
    else:
        why = "is a symlink (or in a symlinked folder)"
    raise InputError(f"{named_by}: {str(p)[:200]} {why} that leads outside the input {root}; biomtl reads only "
                     f"files inside --input")


def require_dir(path: Path | None, what: str = "--input") -> Path:
    if path is None:
        raise InputError(f"{what} is required for this format")
    if not path.exists():
        raise InputError(f"{what}: {path} does not exist")
    if not path.is_dir():
        raise InputError(f"{what}: {path} is not a directory")
    return path


def require_file(path: Path | None, what: str) -> Path:
    if path is None:
        raise InputError(f"{what} is required")
    if not path.exists():
        raise InputError(f"{what}: {path} does not exist")
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise InputError(f"{what}: {path}: {e}") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{what}: {path} is not a file (it is a {file_type(mode)})")
    return path


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------
def _pnm_maxval(head: bytes) -> int | None:
    """maxval of a binary PGM/PPM header (``P5 W H MAXVAL``, comments allowed)."""
    tokens: list[bytes] = []
    for line in head.split(b"\n"):
        tokens += line.split(b"#", 1)[0].split()
        if len(tokens) >= 4:
            try:
                return int(tokens[3])
            except ValueError:
                return None
    return None


def sniff(head: bytes) -> str:
    """Image format from the first bytes (give >= 64): jpg, png, pgm, ppm, gif, bmp,
    ``pnm-ascii`` (P1-P4), ``pnm-slow`` (binary P5/P6 with maxval != 255: Pillow
    decodes those pixel by pixel in Python, ~100x slower: stored as PNG) or other."""
    if head[:3] == b"\xff\xd8\xff":
        return "jpg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:2] in (b"P5", b"P6"):
        if _pnm_maxval(head) != 255:
            return "pnm-slow"
        return "pgm" if head[:2] == b"P5" else "ppm"
    if head[:2] in (b"P1", b"P2", b"P3", b"P4"):
        return "pnm-ascii"  # (P4 is binary, but 1-bit: convert it as well)
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"BM":
        return "bmp"
    return "other"


def sniff_file(path: Path | str) -> str | None:
    """The format of a regular file's first bytes; None when unreadable or not a regular file."""
    try:
        with open_regular(path, "rb") as f:
            return sniff(f.read(64))
    except (OSError, ValueError):
        return None


def choose_image_ext(paths: Iterable[Path | str]) -> str:
    """The stored extension for one image field: the common format of the
    readable files if it is storable as-is, else ``png`` (lossless conversion)."""
    formats = {f for f in (sniff_file(p) for p in paths) if f is not None}
    if len(formats) == 1:
        (fmt,) = formats
        if fmt in STORABLE:
            return fmt
    return "png"


def _pixel_stats(img) -> tuple[np.ndarray, np.ndarray, int]:
    """Of the 8-bit image training decodes (``img`` from :func:`shards.images.to_8bit`), in [0, 1]."""
    if img.mode in ("1", "P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
        img = img.convert("RGB")
    elif img.mode in ("LA", "La"):
        img = img.convert("L")
    return array_stats(np.asarray(img).astype(np.float64) / 255.0)


def array_stats(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel (last axis when 3-D with <= 4 channels) finite sums, sums of squares, count."""
    a = np.asarray(a, dtype=np.float64)
    a = a.reshape(-1, a.shape[-1]) if (a.ndim == 3 and a.shape[-1] <= 4) else a.reshape(-1, 1)
    finite = np.isfinite(a)
    z = np.where(finite, a, 0.0)
    n = int(finite.all(axis=1).sum()) if a.size else 0
    return z.sum(0), (z * z).sum(0), max(n, 0)


def encode_png(img) -> bytes:
    """Lossless PNG of an 8-bit image (:func:`shards.images.to_8bit` first)."""
    buf = io.BytesIO()
    if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
        img = img.convert("RGB")
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def read_image(path: Path | str, ext: str, stats: bool = True) -> tuple[Field, Any]:
    """Read and fully decode one image; the stored bytes are the original file
    when its format is ``ext``, else a PNG of the decoded 8-bit pixels (``ext``
    must then be png). Returns (Field, PIL image with 8-bit samples): the pixels
    training will decode (:mod:`shards.images`; a 16-bit original keeps its
    bytes in the shard, and the reader maps it the same way)."""
    return image_field(read_file_bytes(path), str(path), ext, stats)


def image_field(data: bytes, name: str, ext: str, stats: bool = True) -> tuple[Field, Any]:
    """:func:`read_image` of bytes already read (e.g. a RecordIO record's payload);
    ``name`` names the image in faults."""
    from ..images import open_image

    try:
        img = open_image(data, name)
        w, h = img.size
        if w < 1 or h < 1:
            raise ValueError("empty image")
    except Exception as e:  # PIL raises many types for bad data
        raise SampleError("undecodable image", f"{name}: {type(e).__name__}: {e}") from None
    fmt = sniff(data[:64])
    if fmt != ext:
        if ext != "png":
            raise SampleError("undecodable image", f"{name}: is {fmt}, the dataset stores {ext}")
        data = encode_png(img)
    return Field(data=data, stats=_pixel_stats(img) if stats else None, size=(w, h)), img


def npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the ``.npy`` at ``f``'s position; ``f`` is left at the data."""
    from numpy.lib import format as npformat

    version = npformat.read_magic(f)
    if version == (1, 0):
        return npformat.read_array_header_1_0(f)
    if version == (2, 0):
        return npformat.read_array_header_2_0(f)
    impl = None
    for mod in ("numpy.lib._format_impl", "numpy.lib.format"):
        try:
            impl = getattr(importlib.import_module(mod), "_read_array_header", None)
        except ImportError:
            continue
        if impl is not None:
            break
    if impl is None:
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
    return impl(f, version)


def read_npy(path: Path | str) -> tuple[Field, np.ndarray]:
    """Read one ``.npy`` (numeric; never unpickled: ``allow_pickle=False``); stored as the original bytes.
    An object array (pickled Python objects) is a "undecodable array" fault."""
    data = read_file_bytes(path)
    try:
        dtype = npy_header(io.BytesIO(data))[2]
    except Exception as e:
        raise SampleError("undecodable array", f"{path}: not a .npy array ({type(e).__name__}: "
                                               f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if dtype.hasobject:
        raise SampleError("undecodable array", f"{path}: object array (pickled Python objects) refused; "
                                               "only numeric arrays are packed")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise SampleError("undecodable array", f"{path}: {type(e).__name__}: {e}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf" or arr.size == 0:
        raise SampleError("undecodable array", f"{path}: expected a non-empty numeric array, got "
                                               f"{getattr(arr, 'dtype', type(arr).__name__)}")
    return Field(data=data, stats=array_stats(arr)), arr


def find_csvs(root: Path, given: list[str] | None, faults: list[Fault] | None = None) -> list[Path]:
    """The ``--csv`` files, else every ``*.csv`` under ``root`` (not in hidden folders). Found
    ones that are not regular files (FIFOs, sockets, devices) are left out and, with
    ``faults``, reported ("not a regular file")."""
    if given:
        out = []
        for g in given:
            p = Path(g)
            if not p.is_absolute() and not p.exists():
                p = root / g
            out.append(require_file(p, "--csv"))
        return out
    found = []
    for p in root.rglob("*.csv"):
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        if is_regular(p):
            found.append(inside_input(p, root, rel(p, root)))
        elif not p.is_dir() and faults is not None:
            try:
                what = file_type(os.stat(p).st_mode)
            except OSError as e:
                faults.append(Fault("unreadable file", rel(p, root), str(e)))
                continue
            faults.append(Fault("not a regular file", rel(p, root), f"a {what}: not opened"))
    return sorted(found, key=lambda p: natural_key(str(p)))


def lower_header(row: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k).strip().lower(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()
            if k is not None}


__all__ = ["SOURCES", "Source", "Scan", "Item", "Field", "Fault", "SampleError", "InputError", "get_source",
           "KeyMaker", "sanitize", "natural_key", "choose_image_ext", "read_image", "image_field", "read_npy", "sniff",
           "array_stats", "IMAGE_SUFFIXES", "NotRegularFile", "open_regular", "read_regular", "is_regular",
           "file_type", "npy_header", "inside_input"]
