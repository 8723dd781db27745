"""``biomtl shards upload DIR s3://BUCKET/PREFIX``: put a shard folder made by
``biomtl shards create`` on S3, where ``data.shards`` and ``shards
info|verify`` read it (:mod:`shards.remote`).

Only the files biomtl wrote (:func:`shards.build.owned_entries`: the shards,
the pairs files, the report) are uploaded, the manifest last: a reader finds
the dataset only once every shard it names is there, and a failed upload
leaves no manifest behind. A prefix that already holds a ``manifest.json`` is
refused unless ``overwrite``; then that manifest is deleted first (the old
dataset disappears before any of its shards change) and nothing else is ever
deleted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .build import owned_entries
from .manifest import MANIFEST_NAME, Manifest
from .remote import RemoteError, RemoteRoot, dataset_root, name_problem, s3_filesystem


class UploadError(ValueError):
    """Bad input to an upload (not a dataset, not s3://, a dataset already there): one line."""


def upload(directory: str | Path, destination: str, overwrite: bool = False,
           progress: Callable[[int, int], None] | None = None) -> int:
    """Upload the dataset ``directory`` to ``destination`` (``s3://...``); returns the number of files."""
    directory = Path(directory)
    owned = owned_entries(directory)
    if owned is None:
        raise UploadError(f"{directory}: not a shard folder made by biomtl (no loadable {MANIFEST_NAME})")
    root = dataset_root(destination)
    if not isinstance(root, RemoteRoot) or not root.startswith("s3://"):
        raise UploadError(f"{destination}: uploads go to s3://BUCKET/PREFIX")
    for entries in Manifest.load(directory).splits.values():
        for e in entries:
            if not (directory / e.file).is_file():
                raise UploadError(f"{directory}: shard file {e.file} of the manifest is missing")
            if name_problem(e.file) is not None:
                raise UploadError(f"{directory}: shard file {e.file[:120]!r} {name_problem(e.file)}: "
                                  "a remote reader would refuse it")
    files = sorted(p for p in owned if p != MANIFEST_NAME and (directory / p).is_file()) + [MANIFEST_NAME]
    fs = s3_filesystem()
    manifest_url = root / MANIFEST_NAME
    try:
        if fs.exists(manifest_url):
            if not overwrite:
                raise UploadError(f"{root} already holds a dataset ({manifest_url}); --overwrite replaces it")
            fs.rm_file(manifest_url)
        for i, name in enumerate(files):
            fs.put_file(str(directory / name), root / name)
            if progress is not None:
                progress(i + 1, len(files))
    except UploadError:
        raise
    except PermissionError as e:
        raise RemoteError(f"{root}: access denied ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    except FileNotFoundError as e:
        raise RemoteError(f"{root}: no such bucket ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return len(files)
