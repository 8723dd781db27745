"""What a process killed while saving leaves behind is swept by the next run
that starts beside it, even when the killed run has no checkpoint to resume;
a save in progress (its process alive) and files biomtl did not name stay."""
from __future__ import annotations

import signal
import subprocess
import textwrap
from pathlib import Path

from dist_train.checkpoint import CheckpointManager, CheckpointPolicy
from tests.conftest import PYTHON, REPO

# A first save that never ends: the staging file is written, then the process
# says so and waits on stdin (the test kills it there, as SIGKILL would mid-save).
KILLED_SAVE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from dist_train.checkpoint import CheckpointManager, CheckpointPolicy

    def write(path):
        path.write_bytes(b"x" * 4096)
        print(path.name, flush=True)
        sys.stdin.readline()

    manager = CheckpointManager(Path(sys.argv[1]), CheckpointPolicy("loss", "min", 1, 0), is_main=True)
    manager.save(write, step=1, metrics=None)
""")


def _policy() -> CheckpointPolicy:
    return CheckpointPolicy("loss", "min", 1, 0)


def test_staging_of_a_save_killed_by_sigkill_is_swept_by_the_next_run(tmp_path: Path) -> None:
    killed = tmp_path / "runs" / "exp_20250101-000000" / "checkpoints"
    proc = subprocess.Popen([PYTHON, "-c", KILLED_SAVE, str(killed)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        staging = killed / proc.stdout.readline().strip()  # the save is under way
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert staging.is_file() and staging.name.startswith(".staging")
    foreign = [killed / ".staging-notes.txt", killed / "staging.pt", tmp_path / "runs" / "notes" / ".staging.pt"]
    for path in foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not biomtl's")
    CheckpointManager(tmp_path / "runs" / "exp_20250102-000000" / "checkpoints", _policy(), is_main=True).prepare()
    assert not staging.exists()
    assert all(p.read_text() == "not biomtl's" for p in foreign)


def test_a_save_in_progress_beside_a_new_run_is_left_alone(tmp_path: Path) -> None:
    """This process stands for a run still saving: its staging folder must survive."""
    busy = tmp_path / "runs" / "other_20250101-000000" / "checkpoints"
    writer = CheckpointManager(busy, _policy(), is_main=True)
    seen: list[bool] = []

    def write(path: Path) -> None:
        path.write_bytes(b"half a checkpoint")
        CheckpointManager(tmp_path / "runs" / "exp_20250102-000000" / "checkpoints", _policy(),
                          is_main=True).prepare()
        seen.append(path.is_file())

    writer.save(write, step=1, metrics=None)
    assert seen == [True] and (busy / "latest.pt").read_bytes() == b"half a checkpoint"
