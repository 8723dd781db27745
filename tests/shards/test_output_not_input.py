"""``biomtl shards create`` writes the dataset apart from its input: an
``--output`` that is the input, holds it or lies inside it is one line, exit 2,
and (``--overwrite`` included) the input is untouched."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from shards import cli
from tests.shards.test_sources import make_folder


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["same", "symlink", "parent", "inside"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_onto_the_input_is_refused_and_the_input_kept(tmp_path: Path, capsys, where: str,
                                                              overwrite: bool) -> None:
    raw = make_folder(tmp_path / "data" / "raw")
    before = _tree(tmp_path / "data")
    out = {"same": raw, "symlink": tmp_path / "link", "parent": tmp_path / "data", "inside": raw / "shards"}[where]
    if where == "symlink":
        os.symlink(raw, out)
    rc = cli.run(["create", "--format", "folder", "--input", str(raw), "--output", str(out), "--workers", "0",
                  "--no-progress", *(["--overwrite"] if overwrite else [])])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "the input" in err[0] and "never overwritten" in err[0], err
    assert _tree(tmp_path / "data") == before
