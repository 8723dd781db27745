"""Atomic writes: the one place that makes a file or a folder appear under its
final name only once it is complete.

At the bottom layer (imports nothing of the toolkit), so the shard writers and
``dist_train`` (checkpoints, logs, reports) share it. Two kinds of temporary
name, for two kinds of place:

- :func:`atomic_write` (and :func:`temp_path`): ``.NAME.tmp<pid>`` beside the
  target, for places one process writes (a run directory, a dataset being
  staged); leftovers of any pid are swept by the next write of ``NAME``.
- :func:`staging_path`: ``.NAME.<kind>-<host>-<pid>-<n>`` beside a folder that
  several processes, on several hosts, may build at once (a dataset);
  :func:`sweep_stale_staging` removes only those of this host whose process is
  gone.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("biomtl.atomic")

# the end of a name atomic_write leaves behind when killed (.NAME.tmp<pid>, .NAME.old<pid>)
STALE_SUFFIX = re.compile(r"\.(tmp|old)\d+$")


def temp_path(path: str | os.PathLike) -> Path:
    """Where :func:`atomic_write` writes ``path`` before the rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` next to ``path``, then rename, so a reader (or a resume after
    a crash) never sees half a file or folder. The temp file is removed when
    ``write`` fails; temp files of ``path`` left by a killed process (any pid: one
    process writes a given name) are swept first. An ``OSError`` names ``path``
    (``write`` on an open file does not)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path)
        write(tmp)
        move_into_place(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            remove(tmp)
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp)):
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    return path


def sweep_stale(path: Path) -> None:
    """Remove what killed writers of ``path`` left beside it: ``.NAME.tmp<pid>``
    (a temp file or folder) and ``.NAME.old<pid>`` (a folder being swapped out)."""
    prefix = f".{Path(path).name}."
    for leftover in Path(path).parent.glob(f"{glob.escape(prefix)}*"):
        if STALE_SUFFIX.fullmatch(leftover.name[len(prefix) - 1:]):
            remove(leftover)


def move_into_place(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; a directory ``dst`` is swapped, never half-written."""
    if dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old{os.getpid()}")
        remove(old)
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(old, dst)  # keep the previous version under its name
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def remove(path: Path) -> None:
    """Delete a file or a folder tree; nothing when it is not there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# ---------------------------------------------------------------------------
# folders built by several processes or hosts at once


def staging_path(out: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of ``out`` named for this host and process (what
    :func:`sweep_stale_staging` reads): ``.OUT.<kind>-<host>-<pid>-<n>``."""
    return out.parent / f".{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{time.time_ns() % 10 ** 9}"


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id we may judge (kill(0) would signal our group)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale_staging(out: Path, kinds: tuple[str, ...] = ("tmp",)) -> list[Path]:
    """Remove the :func:`staging_path` folders of ``out`` of these ``kinds`` that a
    killed process left: named for this host and a pid no longer alive. Other
    hosts' and live processes' stay. Returns what was removed."""
    removed: list[Path] = []
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return removed
    host = socket.gethostname()
    for kind in kinds:
        head = f".{out.name}.{kind}-{host}-"
        for p in siblings:
            if not p.name.startswith(head):
                continue
            pid, _, n = p.name[len(head):].partition("-")
            if not (pid.isdigit() and n.isdigit()) or pid_alive(int(pid)):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
                log.info("removed %s, left by an interrupted writer (pid %s)", p, pid)
    return removed
