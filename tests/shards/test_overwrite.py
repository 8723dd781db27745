"""Issue 22 point 1: ``shards create --overwrite`` replaces only a folder biomtl made
(its manifest's files and nothing else), never the input, never a foreign folder; the
output may not be inside the input nor the input inside the output. Every refusal is
one line, exit 2, and leaves every file as it was."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.cli import run as shards_cli
from shards.manifest import Manifest


def _faces(root: Path) -> Path:
    for i in range(3):
        for k in range(2):
            p = root / f"id{i}" / f"{k}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((10, 12), 30 * i + k, np.uint8)).save(p)
    return root


def _tree(root: Path) -> dict[str, str]:
    """Every path beside and under ``root`` (its parent's whole tree) -> content hash: what must not change."""
    out = {}
    for p in sorted(root.parent.rglob("*")):
        out[str(p.relative_to(root.parent))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _create(inp: Path, out: Path, *extra: str) -> list[str]:
    return ["create", "--format", "folder", "--input", str(inp), "--output", str(out), "--split-by", "sample",
            "--splits", "train=0.5,test=0.5", "--workers", "1", "--no-progress", *extra]


def _refused(capsys, argv: list[str], words: str) -> None:
    rc = shards_cli(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and words in err, err


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_output_the_input_itself_is_refused(tmp_path, capsys, overwrite):
    raw = _faces(tmp_path / "raw")
    before = _tree(raw)
    _refused(capsys, _create(raw, raw, *overwrite), "--output")
    assert _tree(raw) == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_output_inside_the_input_is_refused(tmp_path, capsys, overwrite):
    raw = _faces(tmp_path / "raw")
    before = _tree(raw)
    _refused(capsys, _create(raw, raw / "shards", *overwrite), "inside the input")
    assert _tree(raw) == before and not (raw / "shards").exists()


def test_input_inside_the_output_is_refused(tmp_path, capsys):
    raw = _faces(tmp_path / "data" / "raw")
    before = _tree(raw)
    _refused(capsys, _create(raw, tmp_path / "data", "--overwrite"), "inside the output")
    assert _tree(raw) == before


def test_a_metadata_file_input_inside_the_output_is_refused(tmp_path, capsys):
    ears = _faces(tmp_path / "ears")
    (ears / "meta.csv").write_text("image_path,x1,y1,x2,y2\nid0/0.png,1,1,5,5\nid1/0.png,1,1,5,5\n")
    before = _tree(ears)
    _refused(capsys, ["create", "--format", "ear", "--input", str(ears / "meta.csv"), "--output", str(ears),
                      "--split-by", "sample", "--overwrite"], "inside the output")
    assert _tree(ears) == before


def test_overwrite_of_a_foreign_folder_is_refused(tmp_path, capsys):
    raw = _faces(tmp_path / "raw")
    foreign = tmp_path / "photos"
    (foreign / "holiday").mkdir(parents=True)
    (foreign / "holiday" / "beach.jpg").write_bytes(b"my picture")
    before = _tree(foreign)
    _refused(capsys, _create(raw, foreign, "--overwrite"), "biomtl did not write")
    assert _tree(foreign) == before


def test_without_overwrite_an_existing_dataset_is_refused(tmp_path, capsys):
    raw = _faces(tmp_path / "raw")
    out = tmp_path / "out"
    assert shards_cli(_create(raw, out)) == 0
    before = _tree(out)
    _refused(capsys, _create(raw, out), "--overwrite")
    assert _tree(out) == before


def test_overwrite_of_a_dataset_holding_a_foreign_file_is_refused(tmp_path, capsys):
    raw = _faces(tmp_path / "raw")
    out = tmp_path / "out"
    assert shards_cli(_create(raw, out)) == 0
    (out / "train" / "notes.txt").write_text("mine")
    before = _tree(out)
    _refused(capsys, _create(raw, out, "--overwrite"), "train/notes.txt")
    assert _tree(out) == before


def test_overwrite_of_a_biomtl_dataset_replaces_it(tmp_path, capsys):
    raw = _faces(tmp_path / "raw")
    out = tmp_path / "out"
    assert shards_cli(_create(raw, out, "--seed", "1")) == 0
    old = {p.relative_to(out) for p in out.rglob("*")}
    assert shards_cli(_create(raw, out, "--seed", "2", "--overwrite", "--splits", "train=1")) == 0
    m = Manifest.load(out)
    assert m.created_with["args"]["seed"] == 2 and list(m.splits) == ["train"]
    # the old test split is gone with the dataset it belonged to; nothing is left beside it
    assert not (out / "test").exists() and Path("test") in old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]


def test_a_failed_overwrite_leaves_the_old_dataset_as_it_was(tmp_path, capsys):
    raw = _faces(tmp_path / "raw")
    out = tmp_path / "out"
    assert shards_cli(_create(raw, out)) == 0
    (raw / "id0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    before = _tree(out)
    assert shards_cli(_create(raw, out, "--overwrite", "--strict")) == 1  # built beside it, failed, dropped
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]


def test_the_old_dataset_is_removed_by_name_only(tmp_path, caplog):
    """After the swap the set-aside dataset loses only its manifest's files: a file that
    appeared there after the last check stays (and is reported)."""
    import logging

    from shards.build import _remove_owned, owned_entries

    raw = _faces(tmp_path / "raw")
    old = tmp_path / "old"
    assert shards_cli(_create(raw, old)) == 0
    owned = owned_entries(old)
    assert {"manifest.json", "report.json", "train", "test"} <= owned
    (old / "train" / "late.txt").write_text("appeared after the check")
    with caplog.at_level(logging.WARNING, logger="shards.build"):
        _remove_owned(old, owned)
    assert sorted(p.relative_to(old).as_posix() for p in old.rglob("*")) == ["train", "train/late.txt"]
    assert any(str(old) in r.getMessage() for r in caplog.records)


def test_overwrite_through_a_symlinked_output_is_refused(tmp_path, capsys):
    raw = _faces(tmp_path / "raw")
    real = tmp_path / "real"
    assert shards_cli(_create(raw, real)) == 0
    (tmp_path / "link").symlink_to(real)
    before = _tree(real)
    _refused(capsys, _create(raw, tmp_path / "link", "--overwrite"), "symlink")
    assert _tree(real) == before and (tmp_path / "link").is_symlink()
