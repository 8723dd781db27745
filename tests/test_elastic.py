"""Failures under torchrun: a killed worker is restarted and the run resumes by
itself; a rank that raises brings the job down with its error, not a hang.

Faults are injected deterministically by launch/faults.py (BIOMTL_FAULT_*)."""
from __future__ import annotations

import csv
import os
import subprocess
import time
from pathlib import Path

from dist_train.checkpoint import safe_load
from tests.conftest import PYTHON, REPO, tiny_overrides


def _torchrun(tmp_path: Path, max_restarts: int, fault_env: dict[str, str], timeout: float,
              **overrides: object) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **fault_env}
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.2", "dist_train/main.py",
           "--config", "configs/facecom.yaml", *tiny_overrides(tmp_path, **overrides)]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - started


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_killed_worker_restarts_and_resumes_without_losing_a_step(tmp_path: Path) -> None:
    """Rank 1 SIGKILLs itself right after the step-4 checkpoint (first attempt
    only); torchrun restarts the group, which finds the first attempt's run
    directory by the launch id and resumes from its latest checkpoint."""
    proc, _ = _torchrun(tmp_path, 1, {"BIOMTL_FAULT_KILL_AT_STEP": "4", "BIOMTL_FAULT_RANK": "1"}, timeout=400,
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
    the job ends non-zero with the exception shown, well before the collective
    timeout (60 s here; the default of 1800 s would also never be reached)."""
    timeout_s = 60
    proc, elapsed = _torchrun(tmp_path, 0, {"BIOMTL_FAULT_RAISE_AT_STEP": "2"}, timeout=240,
                              train__max_steps=6, dist__timeout_s=timeout_s)
    assert proc.returncode != 0
    assert "injected failure on rank 1 after step 2" in proc.stderr, proc.stderr[-5000:]
    assert "InjectedFault" in proc.stderr
    # Root cause in torchrun's summary (main.py runs under torch.distributed.elastic's @record).
    summary = proc.stderr[proc.stderr.rfind("Root Cause"):]
    assert "rank      : 1" in summary and "injected failure" in summary, summary
    assert elapsed < 240
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
