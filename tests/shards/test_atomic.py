"""One atomic-write helper at the bottom layer (``shards/atomic.py``, issue 23):
the shard writer, the manifest, the dataset builders and the checkpoint module
all publish through it."""
from __future__ import annotations

import os
import re
import socket

import pytest

from shards import atomic
from shards.manifest import Manifest
from shards.writer import ShardSplitWriter
from tests.conftest import REPO


def test_the_checkpoint_module_uses_the_bottom_layer_writer():
    from dist_train import checkpoint

    assert checkpoint.atomic_write is atomic.atomic_write


def test_only_the_atomic_module_renames_files_into_place():
    """``os.replace`` (publishing a file) appears nowhere else in shipped code; the
    two dataset installers rename a whole staging folder (``os.rename``: it must not
    replace a dataset another process finished first) and take its name from
    :func:`shards.atomic.staging_path`."""
    found = []
    for pkg in ("launch", "dist_train", "recipes", "models", "shards"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            text = path.read_text()
            if rel != "shards/atomic.py" and "os.replace(" in text:
                found.append(rel)
            if rel != "shards/atomic.py" and re.search(r"\.tmp-\{|\.partial\"|\.tmp\{os\.getpid\(\)\}", text):
                found.append(rel + " (own temp name)")
    assert not found, found


def test_atomic_write_leaves_nothing_when_write_fails(tmp_path):
    target = tmp_path / "f.txt"

    def fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as info:
        atomic.atomic_write(target, fail)
    assert info.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []
    atomic.atomic_write(target, lambda tmp: tmp.write_text("whole"))
    assert target.read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_shard_writer_publishes_through_the_helper_and_aborts_cleanly(tmp_path, monkeypatch):
    seen = []
    real = atomic.move_into_place
    monkeypatch.setattr("shards.writer.move_into_place", lambda s, d: (seen.append((s, d)), real(s, d)))
    with ShardSplitWriter(tmp_path, "train", maxcount=2) as w:
        for i in range(3):
            w.write({"__key__": f"k{i}", "txt": "x"})
    assert [d.name for _, d in seen] == ["shard-000000.tar", "shard-000001.tar"]
    assert all(s == atomic.temp_path(d) for s, d in seen)
    w = ShardSplitWriter(tmp_path, "val")
    w.write({"__key__": "a", "txt": "x"})
    w.abort()
    assert list((tmp_path / "val").iterdir()) == []


def test_manifest_save_is_atomic_and_readable_by_others(tmp_path, monkeypatch):
    calls = []
    real = atomic.atomic_write
    monkeypatch.setattr("shards.manifest.atomic_write", lambda p, w: (calls.append(p), real(p, w))[1])
    old = os.umask(0o022)
    try:
        Manifest(identities=["a"]).save(tmp_path)
    finally:
        os.umask(old)
    assert calls == [tmp_path / "manifest.json"]
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_staging_sweep_removes_dead_processes_folders_only(tmp_path):
    out = tmp_path / "data"
    host = socket.gethostname()
    mine = atomic.staging_path(out)
    assert mine.name.startswith(f".data.tmp-{host}-{os.getpid()}-")
    dead = tmp_path / f".data.tmp-{host}-999999999-1"
    other_host = tmp_path / ".data.tmp-elsewhere-999999999-1"
    old = tmp_path / f".data.old-{host}-999999999-1"
    for p in (mine, dead, other_host, old):
        p.mkdir()
    assert atomic.sweep_stale_staging(out) == [dead]
    assert mine.is_dir() and other_host.is_dir() and old.is_dir() and not dead.exists()
    assert atomic.sweep_stale_staging(out, ("old",)) == [old]
