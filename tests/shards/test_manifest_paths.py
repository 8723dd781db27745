"""A manifest is untrusted input: a shard file it names must be inside the
dataset directory (not absolute, no ``..``, not resolving outside through a
symlinked parent), for every reader: Manifest.load / shard_path, the
streaming loaders, the P×K index, ``shards_of``, ``biomtl shards verify`` and
``info``. The refusal is one line naming the entry; the outside file is never
opened, so its bytes never reach an error."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shards import cli
from shards.batching import build_index, build_pk_loader
from shards.manifest import MANIFEST_NAME, Manifest, ShardEntry, UnsafeShardPath
from shards.reading import shards_of
from shards.stream import build_eval_loader, build_train_loader
from shards.writer import ShardSplitWriter

SECRET = "SECRET-BYTES-OUTSIDE"


def _tar(directory: Path, split: str, start: int = 0) -> ShardEntry:
    """One shard of two samples whose json carries SECRET (to see whether it was read)."""
    with ShardSplitWriter(directory, split, maxcount=10 ** 6, start_index=start) as w:
        for i in range(2):
            w.write({"__key__": f"s{start}{i}", "json": {"identity": i, "note": SECRET}})
    (entry,) = w.close()
    return entry


def _dataset(root: Path, file: str, entry: ShardEntry) -> Path:
    """A dataset directory whose manifest names ``file`` (with ``entry``'s count, size and sha256)."""
    root.mkdir(parents=True, exist_ok=True)
    e = {"file": file, "count": entry.count, "bytes": entry.bytes, "sha256": entry.sha256}
    d = {**Manifest(identities=["a", "b"], modalities=["json"]).to_dict(), "splits": {"train": [e]}}
    (root / MANIFEST_NAME).write_text(json.dumps(d))
    return root


@pytest.fixture
def outside_shard(tmp_path: Path) -> tuple[Path, ShardEntry]:
    """A readable shard outside the dataset: tmp/outside.tar."""
    entry = _tar(tmp_path / "elsewhere", "train")
    target = tmp_path / "outside.tar"
    os.replace(tmp_path / "elsewhere" / entry.file, target)
    return target, entry


def _cases(tmp_path: Path, outside_shard: tuple[Path, ShardEntry]) -> dict[str, Path]:
    target, entry = outside_shard
    passwd = ShardEntry("/etc/passwd", 2, 100, "0" * 64)
    # a symlinked parent: data/train -> a folder outside holding a shard
    linked = tmp_path / "linked"
    _tar(tmp_path / "linked_target", "train")
    (tmp_path / "linked").mkdir()
    os.symlink(tmp_path / "linked_target" / "train", linked / "train")
    linked_entry = ShardEntry("train/shard-000000.tar", 2, entry.bytes, entry.sha256)
    return {
        "dotdot": _dataset(tmp_path / "dotdot", "../outside.tar", entry),
        "absolute": _dataset(tmp_path / "absolute", str(target), entry),
        "etc_passwd": _dataset(tmp_path / "etc_passwd", "/etc/passwd", passwd),
        "nested_dotdot": _dataset(tmp_path / "nested", "train/../../outside.tar", entry),
        "symlinked_parent": _dataset(linked, linked_entry.file, linked_entry),
    }


CASES = ["dotdot", "absolute", "etc_passwd", "nested_dotdot", "symlinked_parent"]


def _no_secret(text: str) -> None:
    assert SECRET not in text and "root:" not in text, text


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    assert "shard file" in text and "must be inside" in text, text
    _no_secret(text)
    return text


@pytest.mark.parametrize("case", CASES)
def test_manifest_load_refuses_a_shard_outside_the_dataset(tmp_path, outside_shard, case):
    data = _cases(tmp_path, outside_shard)[case]
    with pytest.raises(UnsafeShardPath) as info:
        Manifest.load(data)
    line = _one_line(info.value)
    named = json.loads((data / MANIFEST_NAME).read_text())["splits"]["train"][0]["file"]
    assert repr(named) in line


@pytest.mark.parametrize("case", CASES)
def test_every_reader_refuses_it(tmp_path, outside_shard, case):
    data = _cases(tmp_path, outside_shard)[case]

    def transform(sample, train):
        return {"identity": sample["json"]["identity"]}

    readers = {
        "train stream": lambda: list(build_train_loader(data, "train", transform, 1, 0, 1, 0, seed=0, epoch=0)),
        "eval stream": lambda: list(build_eval_loader(data, "train", transform, 1, 0, 1)),
        "P×K index": lambda: build_index(data, "train"),
        "P×K loader": lambda: list(build_pk_loader(data, "train", transform, 1, 1, 0, 1, 0, seed=0, epoch=0)),
    }
    for name, read in readers.items():
        with pytest.raises(UnsafeShardPath) as info:
            read()
        _one_line(info.value)


@pytest.mark.parametrize("case", CASES)
def test_shards_of_and_shard_path_refuse_a_manifest_that_was_not_loaded(tmp_path, outside_shard, case):
    """A Manifest built in memory (not through Manifest.load) is checked where its paths are made."""
    data = _cases(tmp_path, outside_shard)[case]
    m = Manifest.from_dict(json.loads((data / MANIFEST_NAME).read_text()))
    for make in (lambda: shards_of(data, m, "train"), lambda: m.shard_path(data, m.splits["train"][0]),
                 lambda: m.verify(data)):
        with pytest.raises(UnsafeShardPath) as info:
            make()
        _one_line(info.value)


@pytest.mark.parametrize("command", ["verify", "info"])
@pytest.mark.parametrize("case", CASES)
def test_shards_verify_and_info_refuse_it(tmp_path, outside_shard, capsys, case, command):
    data = _cases(tmp_path, outside_shard)[case]
    assert cli.run([command, str(data)]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "must be inside" in lines[0], out.err
    _no_secret(out.out + out.err)


def test_a_shard_inside_the_dataset_is_read(tmp_path):
    """Control: the same layout with the shard inside the directory loads and streams
    (so the refusals above are the path's, not the data's)."""
    data = tmp_path / "data"
    entry = _tar(data, "train")
    _dataset(data, entry.file, entry)
    assert Manifest.load(data).shard_path(data, entry) == data / entry.file
    rows = list(build_eval_loader(data, "train", lambda s, train: {"identity": s["json"]["identity"]}, 1, 0, 1))
    assert sorted(int(i) for r in rows for i in r["identity"]) == [0, 1]
    assert Manifest.load(data).verify(data) == []
    # a symlinked dataset directory itself is fine: both sides resolve
    os.symlink(data, tmp_path / "alias")
    alias = Manifest.load(tmp_path / "alias")
    assert alias.shard_path(tmp_path / "alias", alias.splits["train"][0]) == tmp_path / "alias" / entry.file
