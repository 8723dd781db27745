"""Writing one split of a dataset as WebDataset tar shards.

``ShardSplitWriter(root, "train")`` writes ``root/train/shard-000000.tar``,
``shard-000001.tar``, ... rolling over at ``maxcount`` samples or ``maxsize``
bytes. Each shard is written under a temporary name and renamed when it is
complete, so a crash never leaves a plausible-looking half shard. The tar
layout comes from ``webdataset.TarWriter`` (we only feed it bytes); the
timestamps are fixed so the same samples give byte-identical shards.

Values are encoded by extension: ``*.png`` (PIL image or uint8 array, stored
lossless), ``*.jpg``, ``*.npy`` (``np.save``, no pickle), ``json`` / ``*.json``
(dict), ``txt``/``cls`` (str/int), bytes as they are.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import webdataset as wds

from .atomic import move_into_place, remove, temp_path
from .manifest import ShardEntry

SHARD_PATTERN = "shard-%06d.tar"


def check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample key must be a non-empty str, got {key!r}")
    if "." in key:
        raise ValueError(f"sample key {key!r} contains a dot (webdataset splits keys at the first dot)")
    if key.startswith("_") or "/" in key or any(c.isspace() for c in key):
        raise ValueError(f"sample key {key!r}: no leading '_', '/' or whitespace allowed")
    return key


def encode_value(ext: str, value: Any) -> bytes:
    """Encode one field by its extension (the last dotted component)."""
    last = ext.rsplit(".", 1)[-1].lower()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if last in ("png", "jpg", "jpeg", "pgm", "bmp"):
        from PIL import Image

        if isinstance(value, np.ndarray):
            if value.dtype != np.uint8:
                raise ValueError(f"{ext}: image arrays must be uint8, got {value.dtype}")
            value = Image.fromarray(value)
        buf = io.BytesIO()
        if last == "png":
            value.save(buf, format="PNG", compress_level=6)
        elif last in ("jpg", "jpeg"):
            value.save(buf, format="JPEG", quality=95)
        elif last == "pgm":
            value.save(buf, format="PPM")
        else:
            value.save(buf, format="BMP")
        return buf.getvalue()
    if last == "npy":
        arr = np.asarray(value)
        if arr.dtype == object:
            raise ValueError(f"{ext}: object arrays cannot be stored without pickle")
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        return buf.getvalue()
    if last == "json":
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")
    if last in ("txt", "cls", "index"):
        return str(value).encode("utf-8")
    raise ValueError(f"don't know how to encode extension {ext!r} ({type(value).__name__})")


class _HashingFile:
    """A write-only file wrapper that hashes and counts what goes through."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.nbytes += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


class ShardSplitWriter:
    """Write samples of one split into rolling tar shards.

    ``write(sample)`` takes a dict with ``__key__`` (no dots) and extension ->
    value. ``close()`` (or leaving the ``with`` block) finishes the last shard
    and returns the :class:`ShardEntry` list, files relative to ``root``.
    """

    def __init__(self, root: str | os.PathLike, split: str, maxcount: int = 1000,
                 maxsize: int = 1 << 30, start_index: int = 0):
        if maxcount < 1:
            raise ValueError(f"maxcount must be >= 1, got {maxcount}")
        self.root = Path(root)
        self.split = split
        self.maxcount = int(maxcount)
        self.maxsize = int(maxsize)
        self.index = int(start_index)
        (self.root / split).mkdir(parents=True, exist_ok=True)
        self.entries: list[ShardEntry] = []
        self._keys: set[str] = set()
        self._file = None
        self._hf: _HashingFile | None = None
        self._tw: wds.TarWriter | None = None
        self._count = 0
        self._size = 0
        self._rel = ""
        self._tmp: Path | None = None
        self._closed = False

    # --- context manager -------------------------------------------------------
    def __enter__(self) -> "ShardSplitWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # --- writing -------------------------------------------------------------
    def _open(self) -> None:
        self._rel = f"{self.split}/{SHARD_PATTERN % self.index}"
        self._tmp = temp_path(self.root / self._rel)
        self._file = open(self._tmp, "wb")
        self._hf = _HashingFile(self._file)
        # encoder=False: we hand TarWriter bytes; a fixed integer mtime gives
        # reproducible tars (a float one would add a PAX header to every member).
        self._tw = wds.TarWriter(self._hf, encoder=False, mtime=946684800)
        self._count = 0
        self._size = 0

    def _finish(self) -> None:
        if self._tw is None:
            return
        self._tw.close()  # writes the end-of-archive blocks into _hf
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        move_into_place(self._tmp, self.root / self._rel)
        self.entries.append(ShardEntry(file=self._rel, count=self._count, bytes=self._hf.nbytes,
                                       sha256=self._hf.sha.hexdigest()))
        self._tw = self._file = self._hf = self._tmp = None
        self.index += 1

    def write(self, sample: Mapping[str, Any]) -> None:
        if self._closed:
            raise RuntimeError("writer is closed")
        key = check_key(sample.get("__key__"))
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in split {self.split!r}")
        self._keys.add(key)
        obj: dict[str, Any] = {"__key__": key}
        size = 0
        for ext, value in sample.items():
            if ext.startswith("_"):
                continue
            if not ext or ext.startswith(".") or ext.endswith("."):
                raise ValueError(f"bad extension {ext!r} in sample {key!r}")
            b = encode_value(ext, value)
            obj[ext] = b
            size += len(b) + 1024  # + tar header and padding (upper bound)
        if len(obj) == 1:
            raise ValueError(f"sample {key!r} has no fields")
        if self._tw is not None and (self._count >= self.maxcount
                                     or (self._count > 0 and self._size + size > self.maxsize)):
            self._finish()
        if self._tw is None:
            self._open()
        self._tw.write(obj)
        self._count += 1
        self._size += size

    def close(self) -> list[ShardEntry]:
        if not self._closed:
            self._finish()
            self._closed = True
        return list(self.entries)

    def abort(self) -> None:
        """Drop the shard being written (completed shards stay)."""
        if self._tw is not None:
            try:
                self._tw.close()
                self._file.close()
            finally:
                if self._tmp is not None:
                    remove(self._tmp)
            self._tw = self._file = self._hf = self._tmp = None
        self._closed = True
