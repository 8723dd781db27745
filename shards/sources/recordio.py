"""``recordio``: insightface's MXNet RecordIO training sets (MS1MV2/V3, Glint360K, WebFace ...), read without MXNet.

::

    DIR/train.rec     the records
    DIR/train.idx     one "key<TAB>byte offset" line per record (MXNet's MXIndexedRecordIO)
    DIR/property      optional: "num_classes,height,width"

``--input`` is DIR, or a ``.rec`` file whose index is the ``.idx`` beside it.

The format (dmlc-core ``recordio.h``, MXNet ``recordio.py``), little-endian:

* a record is one or more chunks: uint32 magic ``0xced7230a``, uint32 ``lrec``
  (upper 3 bits ``cflag``, lower 29 the length), the bytes, zero padding to 4
  bytes. ``cflag`` 0 is a whole record; 1, 2, 3 start, continue and end a record
  that MXNet's writer split where the payload held the magic at a 4-byte aligned
  place: the magic itself is not stored and is put back between the chunks;
* a record's payload starts with the IRHeader ``struct.pack('IfQQ', flag, label,
  id, id2)`` (24 bytes); when ``flag > 0`` the label is the ``flag`` float32
  values that follow the header, and the image (encoded bytes) comes after.

Which records are images (what insightface's ``MXFaceDataset`` reads): when
record 0 has ``flag > 0`` (insightface's writer: label = (first identity record,
end)), the images are the keys ``1 .. int(label[0]) - 1`` and the records from
``label[0]`` on describe identities (not read); otherwise every key of the index
is an image. The identity is ``int(label)`` (``label[0]`` for a vector label),
named ``id_<label>``; keys are ``id_<label>_<record key>``; the sample's json
holds ``record`` (the key). Images are stored as their bytes when all share one
storable format (insightface's JPEGs: ``image.jpg``), else as PNG.

Records are read one at a time by offset (``os.pread``, so forked workers
share nothing): the scan reads each image record's header and first image
bytes, the workers the whole record. Faults:

* the input as a whole (one line, exit 2, nothing written): no ``.rec`` or no
  ``.idx``, an index line that is not ``key<TAB>offset``, a key listed twice, an
  offset past the end of the ``.rec`` (a cut download, or another file's
  index), a first record without the magic (not a RecordIO file), the last
  record running past the end of the file (truncated), a record 0 whose image
  range names keys the index lacks, an unreadable ``property``;
* one record (counted and named ``train.rec[KEY]`` like a corrupt image, under
  ``--strict`` and the report): ``corrupt record`` (no magic at its offset,
  chunks out of order or past the end, a header shorter than its label vector),
  ``bad label`` (not a finite integer >= 0, or not below ``property``'s class
  count), ``undecodable image``.
"""
from __future__ import annotations

import argparse
import math
import os
import struct
from pathlib import Path
from typing import Any

from . import (STORABLE, Fault, InputError, Item, KeyMaker, SampleError, Scan, Source, image_field, inside_input,
               open_regular, sniff)

MAGIC = 0xCED7230A
LENGTH_MASK = (1 << 29) - 1
IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2 (MXNet packs 'IfQQ' natively: the same 24 bytes)
SNIFF_BYTES = 64  # of the image, to know its format at scan time


class CorruptRecord(Exception):
    """One record cannot be read (``truncated``: it runs past the end of the file)."""

    def __init__(self, detail: str, truncated: bool = False):
        super().__init__(detail)
        self.truncated = truncated


def read_record(fd: int, offset: int, file_size: int, want: int | None = None) -> bytes:
    """The payload of the record at ``offset`` (its chunks joined, the magic put back
    between them); with ``want``, only its first ``want`` bytes (fewer when shorter)."""
    parts: list[bytes] = []
    size, pos, first = 0, offset, True
    while True:
        if pos + 8 > file_size:
            raise CorruptRecord(f"chunk header at offset {pos} runs past the end of the file", truncated=True)
        magic, lrec = struct.unpack("<II", os.pread(fd, 8, pos))
        if magic != MAGIC:
            raise CorruptRecord(f"no RecordIO magic at offset {pos} (0x{magic:08x})")
        cflag, length = lrec >> 29, lrec & LENGTH_MASK
        if cflag not in ((0, 1) if first else (2, 3)):
            raise CorruptRecord(f"chunk at offset {pos} has continuation flag {cflag} "
                                f"{'at the start of a record' if first else 'inside a split record'}")
        if pos + 8 + length > file_size:
            raise CorruptRecord(f"chunk at offset {pos} holds {length} bytes, past the end of the file",
                                truncated=True)
        n = length if want is None else min(length, want - size)
        parts.append(os.pread(fd, n, pos + 8) if n else b"")
        size += n
        pos += 8 + ((length + 3) & ~3)
        if cflag in (0, 3) or (want is not None and size >= want):
            break
        parts.append(struct.pack("<I", MAGIC))
        size += 4
        first = False
    data = b"".join(parts)
    return data if want is None else data[:want]


def parse_header(payload: bytes) -> tuple[int, list[float], int]:
    """(flag, label values, offset of the image) of a record's payload."""
    if len(payload) < IR_HEADER.size:
        raise CorruptRecord(f"{len(payload)} bytes, shorter than the {IR_HEADER.size}-byte IRHeader")
    flag, label, _, _ = IR_HEADER.unpack_from(payload)
    if flag == 0:
        return 0, [label], IR_HEADER.size
    end = IR_HEADER.size + 4 * flag
    if len(payload) < end:
        raise CorruptRecord(f"IRHeader flag {flag} announces {flag} label values, the record holds "
                            f"{max(len(payload) - IR_HEADER.size, 0) // 4}")
    return flag, list(struct.unpack_from(f"<{flag}f", payload, IR_HEADER.size)), end


def read_index(path: Path, rec: Path, rec_size: int) -> dict[int, int]:
    """key -> offset of a ``.idx`` (in file order); a bad line, a repeated key or an
    offset past the end of ``rec`` refuses the input in one line."""
    index: dict[int, int] = {}
    try:
        with open_regular(path, "r", encoding="ascii", errors="strict", newline=None) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split("\t") if "\t" in line else line.split()
                try:
                    key, offset = int(parts[0]), int(parts[1])
                    if len(parts) != 2:
                        raise ValueError
                except (ValueError, IndexError):
                    raise InputError(f"{path}:{n}: not a 'key<TAB>offset' line: {line.strip()[:80]!r}") from None
                if key in index:
                    raise InputError(f"{path}:{n}: key {key} is listed twice")
                if not 0 <= offset < rec_size:
                    raise InputError(f"{path}:{n}: offset {offset} of key {key} is past the end of {rec} "
                                     f"({rec_size} bytes): the .rec is truncated or the index is another file's")
                index[key] = offset
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text index (key<TAB>offset lines)") from None
    except OSError as e:
        raise InputError(f"{path}: {e}") from None
    if not index:
        raise InputError(f"{path}: the index lists no records")
    return index


def read_property(path: Path) -> dict[str, int]:
    """insightface's ``property``: "num_classes,height,width"."""
    try:
        with open_regular(path, "r", encoding="ascii") as f:
            text = f.read(200)
        num_classes, height, width = (int(x) for x in text.strip().split(","))
        if min(num_classes, height, width) < 1:
            raise ValueError
    except (OSError, UnicodeDecodeError, ValueError):
        raise InputError(f"{path}: not 'num_classes,height,width'") from None
    return {"num_classes": num_classes, "height": height, "width": width}


def identity_label(label: list[float], num_classes: int | None) -> int:
    """The class of a record's label (the first value of a vector); :class:`SampleError` when not a class."""
    v = label[0]
    if not (math.isfinite(v) and v >= 0 and v == int(v)):
        raise SampleError("bad label", f"label {v!r} is not an integer >= 0")
    if num_classes is not None and v >= num_classes:
        raise SampleError("bad label", f"label {int(v)} is not below property's {num_classes} classes")
    return int(v)


class RecordLoader:
    """Reads one image record in a worker (the file is opened once per process)."""

    def __init__(self, rec: str, ext: str):
        self.rec, self.ext = rec, ext
        self._file: Any = None
        self._pid = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"rec": self.rec, "ext": self.ext, "_file": None, "_pid": 0}

    def __call__(self, item: Item) -> dict[str, Any]:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open_regular(self.rec, "rb"), os.getpid()
        fd, size = self._file.fileno(), os.fstat(self._file.fileno()).st_size
        name = item.origin
        try:
            payload = read_record(fd, item.payload["offset"], size)
            _, _, start = parse_header(payload)
        except CorruptRecord as e:
            raise SampleError("corrupt record", f"{name}: {e}") from None
        f, _ = image_field(payload[start:], name, self.ext)
        return {f"image.{self.ext}": f}


def _input_files(input_path: Path | None) -> tuple[Path, Path, Path]:
    """(dataset folder, .rec, .idx), each checked to be a regular file inside the folder."""
    if input_path is None:
        raise InputError("--input is required for --format recordio (a folder with train.rec and train.idx)")
    if input_path.is_dir():
        root, rec = input_path, input_path / "train.rec"
    else:
        root, rec = input_path.parent, input_path
        if rec.suffix != ".rec":
            raise InputError(f"--input: {input_path} is neither a folder nor a .rec file")
    idx = rec.with_suffix(".idx")
    for p, what in ((rec, "records"), (idx, "index")):
        if not p.exists():
            raise InputError(f"--input: {p} not found (the {what} of a RecordIO dataset: train.rec needs "
                             "train.idx beside it)")
        inside_input(p, root, p.name)
        if not p.is_file():
            raise InputError(f"--input: {p} is not a regular file")
    return root, rec, idx


def _check_ends(fd: int, rec: Path, index: dict[int, int], size: int) -> None:
    """The first record starts with the magic; the last one ends inside the file."""
    first, last = min(index.values()), max(index.values())
    head = os.pread(fd, 4, first)
    if len(head) < 4 or struct.unpack("<I", head)[0] != MAGIC:
        raise InputError(f"{rec}: no RecordIO magic (0xced7230a) at offset {first}: not an MXNet RecordIO file")
    try:
        read_record(fd, last, size)
    except CorruptRecord as e:
        if e.truncated:
            raise InputError(f"{rec}: truncated: the last record (offset {last}) runs past the end of the file "
                             f"({size} bytes)") from None


def _image_keys(fd: int, rec: Path, idx: Path, index: dict[int, int], size: int) -> tuple[list[int], Any]:
    """The keys of the image records (see the module doc) and record 0's header range (or None)."""
    if 0 not in index:
        return list(index), None
    try:
        flag, label, _ = parse_header(read_head(fd, size, index[0], 0))
    except CorruptRecord as e:
        raise InputError(f"{rec}: record 0 (the header record) is unreadable: {e}") from None
    if flag == 0:
        return list(index), None
    if len(label) < 2 or not all(math.isfinite(v) and v >= 1 for v in label[:2]):
        raise InputError(f"{rec}: record 0's header label {label[:2]} is not (first identity record, end)")
    end = int(label[0])
    if end - 1 > len(index):  # (before listing a range that may be huge)
        raise InputError(f"{rec}: record 0 says the images are keys 1..{end - 1}, {idx.name} lacks some of them "
                         f"(it lists {len(index)} records)")
    keys = list(range(1, end))
    missing = [k for k in keys if k not in index]
    if missing:
        raise InputError(f"{rec}: record 0 says the images are keys 1..{end - 1}, {idx.name} lacks "
                         f"{len(missing)} of them (first: {missing[0]})")
    return keys, [int(label[0]), int(label[1])]


def read_head(fd: int, size: int, offset: int, extra: int) -> bytes:
    """The first bytes of a record: its IRHeader, label vector and ``extra`` bytes of the image."""
    head = read_record(fd, offset, size, want=IR_HEADER.size + extra)
    flag = IR_HEADER.unpack_from(head)[0] if len(head) >= IR_HEADER.size else 0
    if flag > 0:
        head = read_record(fd, offset, size, want=IR_HEADER.size + 4 * flag + extra)
    return head


def _scan_record(fd: int, size: int, offset: int, num_classes: int | None) -> tuple[int, str]:
    """(identity, image format) of one record, from its header and first image bytes."""
    head = read_head(fd, size, offset, SNIFF_BYTES)
    _, label, start = parse_header(head)
    return identity_label(label, num_classes), sniff(head[start:])


class RecordIOSource(Source):
    name = "recordio"
    help = "DIR/train.rec + DIR/train.idx [+ DIR/property] (insightface MXNet RecordIO), or a .rec file"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def scan(self, input_path: Path | None, args: argparse.Namespace) -> Scan:
        root, rec, idx = _input_files(input_path)
        prop = root / "property"
        props = read_property(inside_input(prop, root, prop.name)) if prop.is_file() else None
        num_classes = props["num_classes"] if props else None
        scan = Scan(items=[])
        keys = KeyMaker()
        formats: set[str] = set()
        with open_regular(rec, "rb") as f:
            fd, size = f.fileno(), os.fstat(f.fileno()).st_size
            index = read_index(idx, rec, size)
            _check_ends(fd, rec, index, size)
            image_keys, header0 = _image_keys(fd, rec, idx, index, size)
            for k in image_keys:
                where = f"{rec.name}[{k}]"
                try:
                    ident, fmt = _scan_record(fd, size, index[k], num_classes)
                except CorruptRecord as e:
                    scan.faults.append(Fault("corrupt record", where, str(e)))
                    continue
                except SampleError as e:
                    scan.faults.append(Fault(e.kind, where, e.detail))
                    continue
                formats.add(fmt)
                name = f"id_{ident}"
                scan.items.append(Item(key=keys(name, str(k)), identity=name, meta={"record": k},
                                       payload={"offset": index[k]}, origin=where))
        if not scan.items:
            raise InputError(f"--input {rec}: no readable image records ({len(scan.faults)} corrupt; first: "
                             f"{scan.faults[0] if scan.faults else 'none'})")
        ext = next(iter(formats)) if len(formats) == 1 and next(iter(formats)) in STORABLE else "png"
        if header0 is not None:
            scan.ignored.append(f"record 0 (header) and {len(index) - len(image_keys) - 1} identity record(s)")
        scan.notes = {"image_ext": ext, "records": len(index), "image_records": len(image_keys),
                      "header0": header0, "property": props}
        scan.loader = RecordLoader(str(rec), ext)
        return scan


SOURCE = RecordIOSource()
