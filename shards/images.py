"""The one image decoder: bytes or a file -> a fully loaded PIL image whose samples
are 8 bits, the range every transform, model and picture of the toolkit assumes.

Pillow keeps high-bit-depth grey images in modes whose ``convert("L")`` /
``convert("RGB")`` *clips* at 255 instead of scaling: a 16-bit face becomes
almost all white, and two people's faces become the same picture. Every
place that decodes an image (the shard reader, the packer's statistics and
re-encoding, the inference engine, ``verify``/``eval``/``demo``) goes through
:func:`open_image` / :func:`to_8bit`, so they all see the same pixels.

Mode by mode (Pillow's names):

* ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (16-bit grey: PNG, TIFF): full
  range 0..65535 -> 0..255 by ``round(v / 257)``, so an 8-bit image stored as
  16 bits (``v * 257``) comes back exactly;
* ``I`` (32-bit signed int): Pillow uses it for 16-bit PGM/PNM (already
  scaled to 0..65535 from the file's maxval) and 32-bit TIFFs. Values within
  0..65535 are read as 16 bits (as above); anything outside has no range we
  could know (raw sensor counts, signed data): refused with one line
  (:class:`UnsupportedImage`) rather than guessed (a per-image min/max stretch
  would give each image its own contrast);
* ``F`` (32-bit float): the common convention is 0..1: finite values within
  [0, 1] -> ``round(v * 255)``; other floats are refused, for the same reason;
* every other mode (``L``, ``RGB``, ``P``, ``LA``, ``RGBA``, ``1``, ``CMYK``,
  ...) is 8 bits per sample already and is returned as it is.
"""
from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class UnsupportedImage(ValueError):
    """An image whose pixel range cannot be mapped to 8 bits correctly; one line."""


def sixteen_to_8bit(a: np.ndarray) -> np.ndarray:
    """Values 0..65535 -> 0..255, ``round(v / 257)`` (exact for ``v = 257 * k``)."""
    return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)


def to_8bit(img: Any, name: str = "image") -> Any:
    """``img`` with 8-bit samples (see the module doc); ``name`` goes into the error."""
    from PIL import Image

    mode = img.mode
    if mode in SIXTEEN_BIT_MODES:
        return Image.fromarray(sixteen_to_8bit(np.asarray(img)), "L")
    if mode == "I" or mode.startswith("I;"):
        a = np.asarray(img)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise UnsupportedImage(f"{name}: a 32-bit integer image with values {lo}..{hi}: its range is unknown "
                                   "(only 0..65535, read as 16 bits, can be mapped to 8 bits); save it as 8- or "
                                   "16-bit")
        return Image.fromarray(sixteen_to_8bit(a), "L")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if a.size and not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
            raise UnsupportedImage(f"{name}: a floating-point image with values outside [0, 1] (or not finite): its "
                                   "range is unknown; save it as 8- or 16-bit, or scaled to [0, 1]")
        return Image.fromarray(np.rint(a * 255.0).astype(np.uint8), "L")
    return img


def open_image(source: bytes | str | os.PathLike, name: str | None = None) -> Any:
    """Decode ``source`` (the encoded bytes, or a file path) fully, with 8-bit samples.
    Decoding errors are Pillow's (``OSError``, ``ValueError``, ...); a range that
    cannot be mapped is :class:`UnsupportedImage`."""
    from PIL import Image

    if isinstance(source, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(source)))
        shown = name or "image"
    else:
        img = Image.open(source)
        shown = name or str(source)
    try:
        img.load()
        out = to_8bit(img, shown)
    except BaseException:
        img.close()
        raise
    if out is not img:
        img.close()
    return out
