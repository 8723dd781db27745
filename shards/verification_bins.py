"""insightface's face-verification ``.bin`` files (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW).

A ``.bin`` is a pickle of ``(images, issame)``: ``images`` a list of encoded
images (JPEG/PNG bytes), two per pair (pair ``i`` is images ``2i`` and
``2i + 1``), ``issame`` one bool per pair. insightface's own files were
written by Python 2 (``str`` items, read back as ``bytes`` with
``encoding="bytes"``); files written again by Python 3 hold ``bytes``.

A pickle can run any code while it loads, and a ``.bin`` comes from the
internet: :class:`_DataOnlyUnpickler` builds nothing but the builtin
containers and scalars the pickle opcodes make by themselves (list, tuple,
bytes, str, bool, int; a dict/float/None parses but fails the shape check).
Every import a pickle asks for goes through ``find_class`` and is refused, with
one exception, see :func:`_latin1_bytes`. Persistent ids (``PERSID``) are
refused by ``pickle.Unpickler`` itself when no ``persistent_load`` is defined.
"""
from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["BinFormatError", "VerificationBin", "read_bin", "bin_name"]


class BinFormatError(ValueError):
    """The file is not a verification ``.bin`` this reader accepts (one line, naming the file)."""


def _latin1_bytes(text: object, encoding: object = "latin1") -> bytes:
    """What ``_codecs.encode`` is asked to do by a Python 3 pickle of ``bytes`` at
    protocol <= 2 (``bytes.__reduce_ex__`` gives ``(_codecs.encode, (latin-1 text,
    "latin1"))``). This function stands in for ``_codecs.encode``: it turns a
    ``str`` into ``bytes`` and does nothing else, so admitting it runs no code
    the file chose; any other argument is refused."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is admitted only as encode(str, 'latin1') (bytes)")
    return text.encode("latin1")


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a verification .bin holds only "
                                     "lists of bytes and bools (pickled code or classes are never loaded)")


@dataclass(frozen=True)
class VerificationBin:
    """Pair ``i`` is ``images[2 * i]``, ``images[2 * i + 1]``; ``issame[i]`` True = same person."""

    path: Path
    images: tuple[bytes, ...]
    issame: np.ndarray  # [pairs] bool

    @property
    def name(self) -> str:
        return bin_name(self.path)

    def __len__(self) -> int:
        return int(self.issame.size)


def bin_name(path: str | os.PathLike) -> str:
    """The set's name, as metrics and reports call it: ``.../cfp_fp.bin`` -> ``cfp_fp``."""
    return Path(path).stem


def read_bin(path: str | os.PathLike) -> VerificationBin:
    """Load and shape-check a ``.bin`` (the images stay encoded); :class:`BinFormatError` else."""
    p = Path(path)
    if not p.is_file():
        raise BinFormatError(f"{p}: verification .bin not found (or not a regular file)")
    try:
        raw = p.read_bytes()
        obj = _DataOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except OSError as exc:
        raise BinFormatError(f"{p}: cannot read ({exc.strerror or type(exc).__name__})") from None
    except pickle.UnpicklingError as exc:
        raise BinFormatError(f"{p}: not a verification .bin: {(str(exc).splitlines() or [''])[0][:200]}") from None
    except Exception as exc:  # truncated or garbled pickle: EOFError, ValueError, ...
        raise BinFormatError(f"{p}: not a readable pickle ({type(exc).__name__})") from None
    return _checked(p, obj)


def _checked(p: Path, obj: object) -> VerificationBin:
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise BinFormatError(f"{p}: expected a pickled pair (list of images, list of issame flags), "
                             f"got {type(obj).__name__}")
    images, issame = obj
    if not isinstance(images, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise BinFormatError(f"{p}: the images and the issame flags must be lists")
    if not all(type(x) is bytes for x in images):
        raise BinFormatError(f"{p}: every image must be encoded bytes")
    if not all(type(x) is bool or (type(x) is int and x in (0, 1)) for x in issame):
        raise BinFormatError(f"{p}: every issame flag must be a bool")
    if len(images) != 2 * len(issame):
        raise BinFormatError(f"{p}: {len(images)} images for {len(issame)} issame flags; a .bin holds two "
                             "images per pair")
    flags = np.asarray([bool(x) for x in issame], bool)
    if not flags.any() or flags.all():
        raise BinFormatError(f"{p}: needs both same-person and different-person pairs "
                             f"({int(flags.sum())} of {flags.size} pairs are same-person)")
    return VerificationBin(path=p, images=tuple(images), issame=flags)
