"""``biomtl`` subcommands that work on a trained checkpoint (eval, extract, verify).

Each module exposes ``run(argv, prog) -> int``; user mistakes (missing file, not
a checkpoint, bad option) print one line ``error: ...`` and return 2.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same file or folder, whatever the
    spelling: the same inode when both exist (symlinks, hard links, ``./x``,
    ``../d/x``), else the same fully resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def _inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    return Path(folder).is_dir() and Path(path).resolve().is_relative_to(Path(folder).resolve())


def output_clash(output_flag: str, output: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike]],
                 folders_whole: bool = False) -> str | None:
    """The one-line reason why ``output`` may not be written, or None: a
    command never writes onto one of its inputs (``inputs``: ``(flag, path)``).
    ``folders_whole``: an input folder is one thing (a DeepSpeed checkpoint),
    so nothing may be written inside it either."""
    for flag, path in inputs:
        if path is None:
            continue
        if same_path(output, path) or (folders_whole and _inside(output, path)):
            where = "is" if same_path(output, path) else "is inside"
            return (f"{output_flag} {output} {where} the input {flag} {path}; "
                    f"write the output somewhere else (an input is never overwritten)")
    return None
