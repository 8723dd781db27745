"""The lock that keeps two processes of one host from building the same
synthetic dataset leaves no file behind, and still excludes while held,
also for a waiter that opened the lock file before the holder removed it."""
from __future__ import annotations

import fcntl
import threading
from pathlib import Path


from shards.synthetic import SyntheticSpec, _file_lock, ensure_synthetic


def _locked_by_someone(path: Path) -> bool:
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return False


def test_building_synthetic_data_leaves_no_lock_file(tmp_path: Path) -> None:
    spec = SyntheticSpec(num_identities=4, samples_per_identity=2, image_size=16, split_by="sample")
    final = ensure_synthetic(tmp_path, spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]


def test_the_lock_excludes_while_held_and_is_gone_after(tmp_path: Path) -> None:
    lock = tmp_path / ".x.lock"
    with _file_lock(lock):
        assert _locked_by_someone(lock)
    assert not lock.exists()


def test_a_waiter_that_opened_the_removed_lock_file_locks_the_current_one(tmp_path: Path, monkeypatch) -> None:
    """The waiter opens the lock file, the holder removes it and unlocks, the waiter
    gets the lock on the removed file: it must take the lock again on the path."""
    lock = tmp_path / ".x.lock"
    waiting = threading.Event()
    real_flock = fcntl.flock

    def flock(fd, op):
        if threading.current_thread().name == "waiter" and op == fcntl.LOCK_EX:
            waiting.set()
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    inside: list[bool] = []

    def waiter() -> None:
        with _file_lock(lock):
            inside.append(lock.exists() and _locked_by_someone(lock))

    with _file_lock(lock):
        thread = threading.Thread(target=waiter, name="waiter")
        thread.start()
        assert waiting.wait(timeout=60)
    thread.join(timeout=60)
    assert not thread.is_alive() and inside == [True]
    assert not lock.exists()
