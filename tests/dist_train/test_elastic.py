"""Failures under torchrun: a killed worker is restarted and the run resumes by
itself; a rank that raises brings the job down with its error, not a hang.

Faults are injected deterministically by launch/faults.py (BIOMTL_FAULT_*)."""
from __future__ import annotations

import pytest
import csv
import os
import subprocess
import time
from pathlib import Path

from dist_train.checkpoint import safe_load
from tests.conftest import PYTHON, REPO, tiny_overrides

pytestmark = pytest.mark.integration  # torchrun / DeepSpeed / SLURM / full training runs


def _torchrun_restarting(tmp_path: Path, fault_env: dict[str, str], **overrides: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **fault_env}
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "--monitor-interval=0.2", "dist_train/main.py", "--config", "configs/facecom.yaml",
           *tiny_overrides(tmp_path, **overrides)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_killed_worker_restarts_and_resumes_without_losing_a_step(tmp_path: Path) -> None:
    """Rank 1 SIGKILLs itself right after the step-4 checkpoint (first attempt
    only); torchrun restarts the group, which finds the first attempt's run
    directory by the launch id and resumes from its latest checkpoint."""
    proc = _torchrun_restarting(tmp_path, {"BIOMTL_FAULT_KILL_AT_STEP": "4", "BIOMTL_FAULT_RANK": "1"},
                                train__max_steps=6, checkpoint__every_steps=2, train__val_every_steps=6)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "exitcode: -9" in out  # the first attempt really lost a worker to SIGKILL
    assert "restart 1: continuing" in out
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs  # the restart went on in the same run directory
    run = runs[0]
    flat = "".join(out.split())  # rich wraps long log lines
    assert f"resumedfrom{run / 'checkpoints' / 'latest.pt'}atstep4" in flat, out[-5000:]
    ckpt = safe_load(run / "checkpoints" / "latest.pt")
    assert ckpt["client"]["loop"]["step"] == 6 and ckpt["client"]["total_steps"] == 6
    assert [int(r["step"]) for r in _rows(run / "logs" / "train_logs.csv")] == [1, 2, 3, 4, 5, 6]
    assert {int(r["step"]) for r in _rows(run / "logs" / "validation_logs.csv")} == {6}  # val (+ test) rows
    assert (run / "checkpoints" / "periodic" / "step_00000004.pt").exists()
    assert (run / "final_metrics.json").exists() and (run / "model.pt").exists()


def test_a_rank_that_raises_stops_the_job_with_its_error(tmp_path: Path) -> None:
    """Rank 1 raises after step 2 while rank 0 goes on into step 3's all-reduce:
    the job ends non-zero with the exception shown, within seconds of the
    failure, far from the collective timeout (dist.timeout_s=60 here; the
    default is 1800 s)."""
    timeout_s = 60
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           "BIOMTL_FAULT_RAISE_AT_STEP": "2"}
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0",
           "--monitor-interval=0.2", "dist_train/main.py", "--config", "configs/facecom.yaml",
           *tiny_overrides(tmp_path, train__max_steps=6, dist__timeout_s=timeout_s)]
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 300
    failed_at = None
    while proc.poll() is None and time.monotonic() < deadline:
        if failed_at is None and "injected failure" in err_path.read_text(errors="replace"):
            failed_at = time.monotonic()  # rank 1 has raised (its traceback is out)
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        raise AssertionError("torchrun still running 300 s after start:\n" + err_path.read_text()[-3000:])
    ended_at = time.monotonic()
    stderr = err_path.read_text(errors="replace")
    assert proc.returncode != 0
    assert "injected failure on rank 1 after step 2" in stderr, stderr[-5000:]
    assert "InjectedFault" in stderr
    assert failed_at is not None and ended_at - failed_at < timeout_s / 2, (ended_at - (failed_at or 0))
    # Root cause in torchrun's summary (main.py runs under torch.distributed.elastic's @record).
    summary = stderr[stderr.rfind("Root Cause"):]
    assert "rank      : 1" in summary and "injected failure" in summary, summary
    runs = list((tmp_path / "runs").iterdir())
    ckpt = runs[0] / "checkpoints" / "latest.pt"
    assert not ckpt.exists() or safe_load(ckpt)["client"]["loop"]["step"] < 6


def test_restart_finds_the_first_attempts_run(tmp_path: Path, monkeypatch) -> None:
    """Which run directory and checkpoint a restarted attempt goes on from
    (rank 0's search, without processes)."""
    from dist_train.config import load_config
    from dist_train.main import LAUNCH_FILE, _find_launch_run, restart_point

    cfg = load_config(REPO / "configs" / "facecom.yaml", tiny_overrides(tmp_path))
    runs = tmp_path / "runs"

    def make_run(name: str, lid: str, with_latest: bool, latest_first: bool = False) -> Path:
        run = runs / name
        (run / "checkpoints").mkdir(parents=True)
        latest = run / "checkpoints" / "latest.pt"
        if with_latest and latest_first:
            latest.write_bytes(b"old")
            os.utime(latest, (1, 1))
        (run / LAUNCH_FILE).write_text(lid + "\n")
        if with_latest and not latest_first:
            latest.write_bytes(b"new")
        return run

    other = make_run("facecom_20260101-000000", "torchrun-other", True)
    mine = make_run("facecom_20260101-000001", "slurm-7/torchrun-7", True)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert restart_point(cfg, None, True) is None  # a first attempt never looks
    assert _find_launch_run(cfg, None) == (str(mine), str(mine / "checkpoints" / "latest.pt"))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert restart_point(cfg, None, True) == (mine, mine / "checkpoints" / "latest.pt")
    # A run resumed by hand whose latest.pt predates this launch (nothing saved yet):
    # go on from the checkpoint the first attempt started from, not the stale latest.
    resumed = make_run("facecom_20260101-000002", "slurm-8/torchrun-8", True, latest_first=True)
    monkeypatch.setenv("SLURM_JOB_ID", "8")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "8")
    start = resumed / "checkpoints" / "periodic" / "step_00000002.pt"
    assert _find_launch_run(cfg, start) == (str(resumed), str(start))
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    assert _find_launch_run(cfg, None) is None and other.exists()
