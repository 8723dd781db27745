"""``biomtl eval --pairs FILE`` whose pairs name image files (the original DCAL code's
``test_pairs.json``) rather than sample keys of a shard split.

Accepted rows: ``{"img1": path, "img2": path, "label": 0|1[, "twin": bool]}`` or
``[path, path, label]``, as a list or under ``{"pairs": [...]}``. A relative
path is looked up under ``--image-root`` (default: the pairs file's folder),
then under the working directory. A row names image files when both ends
have an image suffix (sample keys have none: WebDataset keys hold no dot).

The images are embedded straight from the files; a sample's identity is its
folder's name (the original's ``person_*/`` layout); twin impostor pairs are
those flagged ``"twin"`` in the file (without that field the twin metrics have
no pairs).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from dist_train.commands.extract_cmd import IMAGE_SUFFIXES

__all__ = ["read_path_pairs", "table_from_files"]


def _rows(data: Any) -> list[Mapping[str, Any]] | None:
    rows = data.get("pairs") if isinstance(data, Mapping) else data
    if not isinstance(rows, list) or not rows:
        return None
    out = []
    for r in rows:
        if isinstance(r, (list, tuple)) and len(r) == 3:
            r = {"img1": r[0], "img2": r[1], "label": r[2]}
        if not isinstance(r, Mapping):
            return None
        out.append(r)
    return out


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and Path(value).suffix.lower() in IMAGE_SUFFIXES


def read_path_pairs(pairs_file: Path, image_root: Path | None = None) -> tuple[list[dict[str, Any]], list[Path]] | None:
    """``(rows with img1/img2 as the paths written, [resolved file of each distinct path])``,
    or ``None`` when the file lists sample keys (the usual form). Raises ``ValueError``
    (one line) for a path that is no file."""
    try:
        rows = _rows(json.loads(pairs_file.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # pairs_from_file reports the unreadable file
    if rows is None or not all(_is_path(r.get("img1")) and _is_path(r.get("img2")) for r in rows):
        return None
    root = image_root if image_root is not None else pairs_file.parent
    files: dict[Path, str] = {}      # each image once, named by the first spelling of it
    canonical: dict[str, str] = {}
    for r in rows:
        for text in (r["img1"], r["img2"]):
            if text in canonical:
                continue
            p = Path(text)
            found = next((c for c in ((p,) if p.is_absolute() else (root / p, p)) if c.is_file()), None)
            if found is None:
                raise ValueError(f"--pairs {pairs_file}: image not found: {text} (looked under {root} and .)")
            canonical[text] = files.setdefault(found.resolve(), text)
    rows = [{**r, "img1": canonical[r["img1"]], "img2": canonical[r["img2"]]} for r in rows]
    return rows, list(files)


def table_from_files(rows: list[dict[str, Any]], files: list[Path],
                     extract: Callable[[list[Path]], np.ndarray]) -> dict[str, Any]:
    """The embedding table of the distinct images of ``rows`` (keys = the paths as written)."""
    keys = list(dict.fromkeys(t for r in rows for t in (r["img1"], r["img2"])))  # the order of ``files``
    folders = [f.parent.name for f in files]
    names = sorted(set(folders))
    identity = np.array([names.index(n) for n in folders], np.int64)
    return {"embedding": extract(files), "identity": identity, "twin": np.full(len(keys), -1, np.int64),
            "keys": keys, "identity_names": names}
