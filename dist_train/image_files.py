"""Image files a user hands over (``biomtl verify``, ``extract``, ``predict``,
``eval --pairs`` of image files, the demo page, ``InferenceEngine``): opened
bounded, through :func:`read_image_file` only.

- Only a regular file is read, checked on the open descriptor: a FIFO, a
  device or a folder is refused without a blocking read (``O_NONBLOCK`` open,
  then ``fstat``; no window between a check and the open).
- The pixel count comes from the header, before anything is decoded: above
  :data:`MAX_IMAGE_PIXELS` the file is refused. A 507 KB PNG can declare
  13 000 x 13 000 pixels (1.5 GB and seconds of decoding per request);
  Pillow's own guard only warns below 2 x 89 Mpx.

Every refusal is an :class:`ImageFileError` (a ``ValueError``) whose one-line
message names the file and the cause. The bound is :func:`open_bounded`; the
decoding after it is :func:`read_image_file`, which maps high bit depths to
8 bits with the one image decoder (``shards/images.py``).
"""
from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

MAX_IMAGE_PIXELS = 40_000_000  # 40 Mpx: a 7 300 x 5 500 photograph; face crops are far below


class ImageFileError(ValueError):
    """An image file that is refused or unreadable; the message is one line
    naming it, ``cause`` the same without the path (for a page that shows the
    upload's own name)."""

    def __init__(self, message: str, cause: str | None = None):
        super().__init__(message)
        self.cause = cause or message


class NotAnImage(ImageFileError):
    """A regular file whose bytes are no image Pillow reads."""


def _refuse(p: Path, cause: str, kind: type = ImageFileError) -> ImageFileError:
    return kind(f"{p}: {cause}", cause)


def open_bounded(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS):
    """``path`` opened by Pillow with its header read and nothing decoded,
    once it is known to be a regular file of at most ``max_pixels`` pixels.
    The caller decodes it and closes ``image.fp`` (:func:`read_image_file`)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise ImageFileError(f"image not found: {p}", "image not found") from None
    except OSError as exc:
        raise _refuse(p, f"cannot open it ({exc.strerror or type(exc).__name__})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _refuse(p, "not a regular file (a folder, FIFO or device); expected an image file")
    fh = os.fdopen(fd, "rb")
    try:
        with warnings.catch_warnings():  # Pillow warns from 89 Mpx on; the bound below is lower
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(fh)
            except Image.DecompressionBombError:
                raise _refuse(p, f"the image declares more than {max_pixels:,} pixels; refused before decoding "
                                 f"(resize it first)") from None
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
                raise _refuse(p, f"not an image file ({type(exc).__name__})", NotAnImage) from None
        width, height = img.size
        if width * height > max_pixels:
            raise _refuse(p, f"{width}x{height} pixels is more than the {max_pixels:,} accepted; refused before "
                             f"decoding (resize it first)")
    except BaseException:
        fh.close()
        raise
    return img


def read_image_file(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS):
    """The image of ``path`` decoded with 8-bit samples (a PIL image; the file is
    closed), within :func:`open_bounded`'s bounds. High bit depths are mapped by the
    one image decoder, :func:`shards.images.to_8bit`."""
    from shards.images import UnsupportedImage, to_8bit

    img = open_bounded(path, max_pixels)
    fh = img.fp
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt pixel data
        raise _refuse(Path(path), f"corrupt image data ({type(exc).__name__}: "
                                  f"{(str(exc).splitlines() or [''])[0][:120]})", NotAnImage) from None
    finally:
        fh.close()
    try:
        return to_8bit(img, "the image")
    except UnsupportedImage as exc:
        raise _refuse(Path(path), str(exc).removeprefix("the image: ")) from None
