"""``biomtl`` subcommands that work on a trained checkpoint (eval, extract, verify).

Each module exposes ``run(argv, prog) -> int``; user mistakes (missing file, not
a checkpoint, bad option) print one line ``error: ...`` and return 2.
"""
from __future__ import annotations

import sys


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
