"""Issue 10, shard side: corrupt shards are never silent, optional checksum
verification, the manifest readable like the shards, and no staging folder
left behind by `shards create` (SIGTERM, errors, or a SIGKILL swept later)."""
from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import subprocess
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_train.config import load_config
from dist_train.run_logging import RunLogger
from shards.batching import build_pk_loader
from shards.cli import run as shards_cli
from shards.manifest import Manifest
from shards.reading import CorruptTracker, tar_members
from shards.stream import build_eval_loader, build_train_loader
from shards.writer import ShardSplitWriter
from tests.conftest import PYTHON, REPO, tiny_overrides

IDENTITIES = 4


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def make_faces(root: Path, splits: dict[str, int], per_shard: int, bad: dict[str, set[int]] | None = None) -> Path:
    """Face-recipe shards: ``splits[name]`` samples of IDENTITIES identities in shards of
    ``per_shard``; sample n has an 8x8 ``image.png`` (garbage bytes where n is in
    ``bad[split]``) and ``json`` {"identity", "idx"}."""
    bad = bad or {}
    entries = {}
    for split, count in splits.items():
        with ShardSplitWriter(root, split, maxcount=per_shard) as w:
            for n in range(count):
                img = np.full((8, 8, 3), (n * 7) % 256, np.uint8)
                w.write({"__key__": f"{split}{n:04d}", "json": {"identity": n % IDENTITIES, "idx": n},
                         "image.png": b"not a png" if n in bad.get(split, ()) else img})
        entries[split] = w.close()
    Manifest(splits=entries, identities=[f"p{i}" for i in range(IDENTITIES)],
             modalities=["image.png", "json"]).save(root)
    return root


def tf(sample, train):
    from PIL import Image

    img = sample["image.png"]
    if not isinstance(img, Image.Image):
        raise ValueError("no image")
    return {"x": torch.from_numpy(np.asarray(img, np.float32)[..., 0]), "identity": sample["json"]["identity"],
            "idx": sample["json"]["idx"]}


def flip_padding_byte(path: Path) -> None:
    """Change one byte of a shard that no reader sees (a member's zero padding): only
    its sha256 tells it from the original."""
    for m in tar_members(str(path), None, lambda e: False, with_data=False):
        if m["size"] % 512:
            data = bytearray(path.read_bytes())
            data[m["offset"] + m["size"]] ^= 0xFF
            path.write_bytes(bytes(data))
            return
    raise AssertionError(f"no padded member in {path}")


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


# ---------------------------------------------------------------------------
# 2. a lost shard is never silent
# ---------------------------------------------------------------------------
def test_first_corrupt_event_of_every_shard_is_logged(tmp_path, caplog):
    # manifest order (eval): shard 0 loses 6 samples (past the first 5 warnings), then
    # shard 1 is lost whole; its event must still reach the console
    d = make_faces(tmp_path, {"test": 16}, per_shard=8, bad={"test": {0, 1, 2, 3, 4, 5}})
    (d / "test/shard-000001.tar").unlink()
    with caplog.at_level(logging.WARNING, logger="shards.stream"):
        loader = build_eval_loader(d, "test", tf, 4, 0, 1, max_corrupt_fraction=0.9)
        list(loader)
    logged = messages(caplog)
    assert any("test/shard-000001.tar" in m and "FileNotFoundError" in m for m in logged), logged
    assert sum("test/shard-000000.tar" in m for m in logged) == 5  # rate limit kept within a shard
    assert loader.corrupt_summary() == {"samples": 14, "shards": {"test/shard-000000.tar": 6,
                                                                   "test/shard-000001.tar": 8}}


def test_tracker_logs_a_new_shard_after_the_warnings_are_suppressed(caplog):
    tracker = CorruptTracker("train", 0, 0, planned=1000, max_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="shards.stream"):
        for k in range(20):
            tracker.record("train/a.tar", f"k{k}", "decode failed")
        tracker.record("train/b.tar", None, "short shard: 0 of 30 samples", n=30)
    logged = messages(caplog)
    assert sum("train/a.tar" in m for m in logged) == 5
    assert any("train/b.tar" in m and "short shard" in m for m in logged), logged
    assert tracker.take() == {"train/a.tar": 20, "train/b.tar": 30} and tracker.take() == {}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_summary_per_shard_survives_workers(tmp_path, num_workers):
    d = make_faces(tmp_path, {"train": 24}, per_shard=6, bad={"train": {1, 13}})
    L = build_train_loader(d, "train", tf, 2, 0, 1, num_workers, seed=0, epoch=0, shuffle_buffer=1,
                           max_corrupt_fraction=0.5)
    assert len(list(L)) == 12
    assert L.corrupt_summary() == {"samples": 2, "shards": {"train/shard-000000.tar": 1,
                                                            "train/shard-000002.tar": 1}}
    assert L.corrupt_count() == 2


def test_pk_loader_summary_includes_the_shards_lost_when_indexing(tmp_path, caplog):
    d = make_faces(tmp_path, {"train": 32}, per_shard=8)
    (d / "train/shard-000002.tar").write_bytes(b"")  # lost whole at indexing
    (d / "train/shard-000003.tar").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="shards.batching"):
        L = build_pk_loader(d, "train", tf, 2, 2, 0, 1, 0, seed=0, epoch=0, max_corrupt_fraction=0.6)
    list(L)
    assert L.corrupt_summary() == {"samples": 16, "shards": {"train/shard-000002.tar": 8,
                                                             "train/shard-000003.tar": 8}}
    logged = messages(caplog)
    assert all(any(f"train/shard-00000{i}.tar" in m for m in logged) for i in (2, 3)), logged


def test_epoch_summary_on_the_console(tmp_path, caplog):
    logger = RunLogger(tmp_path, total_steps=4, start_step=0, tensorboard=False, progress=False, plot=False)
    with caplog.at_level(logging.WARNING, logger="biomtl"):
        logger.log_epoch(0, 2, 1.0, {"samples": 0, "shards": {}})
        assert not caplog.records  # a clean epoch prints nothing
        logger.log_epoch(1, 4, 1.0, {"samples": 9, "shards": {"train/shard-000003.tar": 8,
                                                              "train/shard-000000.tar": 1}})
    logger.close()
    assert messages(caplog) == ["epoch 1: skipped 9 corrupt sample(s) in 2 shard(s): "
                                "train/shard-000003.tar (8), train/shard-000000.tar (1)"]


def test_training_reports_a_lost_shard_each_epoch(tmp_path, caplog, monkeypatch):
    from dist_train import run_logging
    from dist_train.main import train

    d = make_faces(tmp_path / "data", {"train": 16, "val": 4, "test": 4}, per_shard=8)
    (d / "train/shard-000001.tar").write_bytes(b"")  # a whole shard lost: 8 of 16 samples
    # keep the root handlers (caplog's) instead of the rich console
    monkeypatch.setattr(run_logging, "setup_console_logging", lambda is_main, rank: None)
    cfg = load_config(REPO / "configs" / "facecom.yaml", tiny_overrides(
        tmp_path, data__source="shards", data__shards=str(d), data__batch_size=8, data__shuffle_buffer=1,
        data__max_corrupt_fraction=0.6, train__epochs=2, recipe__params__augment="false"))
    caplog.set_level(logging.WARNING)
    train(cfg, None)
    logged = messages(caplog)
    summaries = [m for m in logged if "corrupt sample(s) in 1 shard(s)" in m]
    assert summaries == [f"epoch {e}: skipped 8 corrupt sample(s) in 1 shard(s): train/shard-000001.tar (8)"
                         for e in (0, 1)], logged
    assert any(m.startswith("skipping 8 corrupt sample(s)") and "train/shard-000001.tar" in m for m in logged)


# ---------------------------------------------------------------------------
# 3. data.verify_checksums
# ---------------------------------------------------------------------------
@pytest.fixture
def flipped(tmp_path) -> Path:
    d = make_faces(tmp_path / "flipped", {"train": 32, "val": 8}, per_shard=8)  # 4 train shards: 2 per worker
    flip_padding_byte(d / "train/shard-000001.tar")
    assert Manifest.load(d).verify(d) == ["train/shard-000001.tar: sha256 mismatch"]
    return d


def test_checksums_off_streams_a_changed_shard_unchanged(flipped, tmp_path):
    clean = make_faces(tmp_path / "clean", {"train": 32, "val": 8}, per_shard=8)
    for d in (clean, flipped):
        L = build_train_loader(d, "train", tf, 4, 0, 1, 0, seed=0, epoch=0)
        keys = [k for b in L for k in b["__key__"]]
        assert len(keys) == 32 and L.corrupt_count() == 0
    assert keys == [k for b in build_train_loader(clean, "train", tf, 4, 0, 1, 0, seed=0, epoch=0)
                    for k in b["__key__"]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_checksum_mismatch_is_a_corrupt_shard(flipped, num_workers, caplog):
    with caplog.at_level(logging.WARNING, logger="shards.stream"):
        L = build_train_loader(flipped, "train", tf, 4, 0, 1, num_workers, seed=0, epoch=0,
                               max_corrupt_fraction=0.9, verify_checksums=True)
        keys = {k for b in L for k in b["__key__"]}
    assert L.corrupt_summary() == {"samples": 8, "shards": {"train/shard-000001.tar": 8}}
    assert not {f"train{n:04d}" for n in range(8, 16)} & keys  # nothing of it was streamed
    if num_workers == 0:  # (worker processes log to their own stderr)
        assert any("train/shard-000001.tar" in m and "ChecksumMismatch" in m for m in messages(caplog))
    # the default fraction stops the run, naming the shard and why
    with pytest.raises(RuntimeError, match=r"too many corrupt.*train/shard-000001\.tar.*ChecksumMismatch"):
        list(build_train_loader(flipped, "train", tf, 4, 0, 1, num_workers, seed=0, epoch=0,
                                verify_checksums=True))
    with pytest.raises(RuntimeError, match=r"too many corrupt.*train/shard-000001\.tar.*ChecksumMismatch"):
        list(build_eval_loader(flipped, "train", tf, 4, 0, 1, num_workers, verify_checksums=True))
    with pytest.raises(RuntimeError, match=r"train/shard-000001\.tar.*ChecksumMismatch"):
        build_pk_loader(flipped, "train", tf, 2, 2, 0, 1, num_workers, seed=0, epoch=0, verify_checksums=True)
    assert len(list(build_pk_loader(flipped, "train", tf, 2, 2, 0, 1, num_workers, seed=0, epoch=0))) == 8


def test_verify_checksums_from_the_config(flipped, tmp_path):
    from dist_train.trainer import LoaderFactory

    def factory(*overrides: str) -> LoaderFactory:
        cfg = load_config(REPO / "configs" / "facecom.yaml", tiny_overrides(tmp_path) + [
            "data.source=shards", f"data.shards={flipped}", "data.batch_size=4", *overrides])
        return LoaderFactory(cfg, types.SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu")), flipped,
                             types.SimpleNamespace(transform=tf))

    off = factory()
    assert off.cfg.data.verify_checksums is False  # off by default
    assert len(list(off.train(0))) == 8
    on = factory("data.verify_checksums=true")
    with pytest.raises(RuntimeError, match=r"train/shard-000001\.tar.*ChecksumMismatch"):
        list(on.train(0))
    on.cfg.data.batching = "pk"
    with pytest.raises(RuntimeError, match=r"train/shard-000001\.tar.*ChecksumMismatch"):
        on.train(0)
    flip_padding_byte(flipped / "val/shard-000000.tar")
    with pytest.raises(RuntimeError, match=r"val/shard-000000\.tar.*ChecksumMismatch"):
        list(on.val())


# ---------------------------------------------------------------------------
# 4. the manifest is as readable as the shards
# ---------------------------------------------------------------------------
def test_manifest_gets_the_umask_permissions_like_the_shards(tmp_path):
    old = os.umask(0o022)
    try:
        assert shards_cli(["create", "--format", "synthetic", "--output", str(tmp_path / "d"), "--identities",
                           "4", "--samples", "3", "--size", "16", "--modalities", "vis", "--workers", "0",
                           "--no-progress"]) == 0
    finally:
        os.umask(old)
    d = tmp_path / "d"
    mode = stat.S_IMODE((d / "manifest.json").stat().st_mode)
    shard = next(d.glob("train/*.tar"))
    assert mode == stat.S_IMODE(shard.stat().st_mode) == 0o644


# ---------------------------------------------------------------------------
# 5. no staging folder left behind
# ---------------------------------------------------------------------------
def staging(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-"))


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_removes_the_staging_folder(tmp_path, workers):
    out = tmp_path / "packed"
    proc = subprocess.Popen([PYTHON, "-m", "dist_train.cli", "shards", "create", "--format", "synthetic",
                             "--output", str(out), "--identities", "24", "--samples", "10", "--workers",
                             str(workers), "--no-progress"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        # packing has begun once the first split's shard is being written in the staging folder (shards.atomic.temp_path)
        while proc.poll() is None and time.monotonic() < deadline:
            if any(True for p in staging(out) for _ in p.glob("train/.shard-*.tmp*")):
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"create ended before it could be stopped: {proc.communicate()}"
        assert staging(out), "no staging folder within the deadline"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert staging(out) == [] and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert proc.returncode == 128 + signal.SIGTERM, err  # the conventional status of a SIGTERM exit


def dead_pid() -> int:
    child = subprocess.Popen([PYTHON, "-c", "pass"])
    child.wait()
    return child.pid


def test_next_create_sweeps_stale_staging_of_dead_processes(tmp_path):
    out = tmp_path / "packed"
    host, gone = socket.gethostname(), dead_pid()
    stale = tmp_path / f".packed.tmp-{host}-{gone}-12345"
    old = tmp_path / f".packed.old-{host}-{gone}-67"  # a killed --overwrite's previous dataset
    kept = [tmp_path / f".packed.tmp-{host}-{os.getpid()}-1",  # a live process: still packing
            tmp_path / f".packed.tmp-{host}x-{gone}-1",  # another host
            tmp_path / f".other.tmp-{host}-{gone}-1"]  # another target
    for p in [stale, old, *kept]:
        (p / "train").mkdir(parents=True)
        (p / "train" / "shard-000000.tar.partial").write_bytes(b"x" * 1000)
    create = ["create", "--format", "synthetic", "--output", str(out), "--identities", "4", "--samples", "3",
              "--size", "16", "--modalities", "vis", "--workers", "0", "--no-progress"]
    assert shards_cli(create) == 0
    assert (out / "manifest.json").is_file()
    assert not stale.exists()
    # no complete replacement was there when it ran: the old dataset may have been the only copy
    assert old.is_dir()
    assert shards_cli(create + ["--overwrite"]) == 0
    assert not old.exists()
    assert all(p.is_dir() for p in kept)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".packed.")) == sorted(
        p.name for p in kept[:2])


def test_a_failed_create_leaves_nothing(tmp_path):
    raw = tmp_path / "raw"
    (raw / "p0").mkdir(parents=True)
    (raw / "p0" / "1.png").write_bytes(b"not a png")
    assert shards_cli(["create", "--format", "folder", "--input", str(raw), "--output", str(tmp_path / "out"),
                       "--split-by", "sample", "--workers", "0", "--no-progress"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
