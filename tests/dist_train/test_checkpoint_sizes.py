"""What a run keeps on disk: only ``latest`` (and ``periodic/``) hold the
optimizer state a resume needs; ``topk/`` files are written once without it and
``best`` is a hard link to its top-k file (timm's CheckpointSaver does the same),
so a toy run no longer leaves four full copies. ``--resume`` of a best / top-k
file is refused in one line that says which file resumes."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from dist_train.checkpoint import CheckpointManager, CheckpointPolicy, safe_load
from dist_train.config import ConfigError, load_config
from dist_train.main import resolve_resume, train
from dist_train.preflight import load_checked_config
from tests.conftest import PYTHON, REPO, tiny_overrides

FACECOM = REPO / "configs" / "facecom.yaml"


def _trainer_like(step: int) -> dict:
    """The parts of a DDP trainer checkpoint, with an optimizer state twice the weights (Adam)."""
    weights = {"w": torch.full((256,), float(step))}
    return {"model": weights, "optimizer": {"state": {0: {"exp_avg": torch.zeros(256), "exp_avg_sq": torch.zeros(256)}}},
            "scheduler": {"last_epoch": step}, "scaler": {}, "skipped_steps": 0,
            "client": {"loop": {"step": step}}, "format_version": 1}


def test_best_and_topk_hold_no_optimizer_state_and_best_links_its_topk_file(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, CheckpointPolicy("loss", "min", top_k=2, every_steps=2), is_main=True)
    for step, loss in [(1, 3.0), (2, 2.0), (3, 4.0)]:
        manager.save(lambda p, s=step: torch.save(_trainer_like(s), p), step, {"loss": loss})
    latest, best = tmp_path / "latest.pt", tmp_path / "best.pt"
    assert "optimizer" in safe_load(latest)                          # latest resumes
    assert "optimizer" in safe_load(tmp_path / "periodic" / "step_00000002.pt")   # kept to resume from
    top = sorted((tmp_path / "topk").iterdir())
    assert [p.name for p in top] == ["step_00000001.pt", "step_00000002.pt"]
    for p in top:
        kept = safe_load(p)
        assert not {"optimizer", "scheduler", "scaler", "skipped_steps"} & set(kept)
        assert kept["client"]["loop"]["step"] == int(p.stem[-1]) and torch.equal(
            kept["model"]["w"], torch.full((256,), float(p.stem[-1])))
    assert best.stat().st_ino == top[1].stat().st_ino                 # one file on disk, two names
    assert best.stat().st_size < latest.stat().st_size / 2             # weights only: a third of latest here


@pytest.mark.integration  # one short training run and one refused CLI resume
def test_a_trained_run_keeps_lean_best_and_a_resume_from_it_is_one_line(tmp_path: Path) -> None:
    train(load_config(FACECOM, tiny_overrides(tmp_path, train__max_steps=2, train__val_every_steps=1,
                                              checkpoint__top_k=2)), None)
    (run,) = (tmp_path / "runs").iterdir()
    ckpt = run / "checkpoints"
    best, latest = ckpt / "best.pt", ckpt / "latest.pt"
    top = {p.stat().st_ino: p for p in (ckpt / "topk").iterdir()}
    assert len(top) == 2 and best.stat().st_ino in top
    assert "optimizer" not in safe_load(best) and "optimizer" in safe_load(latest)
    assert best.stat().st_size < 0.6 * latest.stat().st_size          # AdamW: two moments per weight
    cfg = load_checked_config(FACECOM, tiny_overrides(tmp_path))
    with pytest.raises(ConfigError, match="best / top-k checkpoint .* resume from RUN/checkpoints/latest.pt") as err:
        resolve_resume(cfg, str(best))
    assert "\n" not in str(err.value)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    proc = subprocess.run([PYTHON, "-m", "dist_train.cli", "train", "--config", str(FACECOM),
                           *tiny_overrides(tmp_path), "--resume", str(best)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "best / top-k checkpoint" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


def test_folder_checkpoints_keep_lean_files_and_drop_an_older_full_best_folder(tmp_path: Path) -> None:
    """A strategy whose checkpoints are folders (DeepSpeed) hands the manager what
    best / top-k keep: files, while latest and periodic/ stay whole folders. A
    resumed run of an older biomtl had a full ``best`` folder: the new best replaces it."""
    def write(folder: Path, step: int) -> None:
        folder.mkdir()
        torch.save(_trainer_like(step), folder / "state.pt")

    def lean(latest: Path) -> dict:
        return {k: v for k, v in safe_load(latest / "state.pt").items() if k not in ("optimizer", "scheduler")}

    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "state.pt").write_bytes(b"older full best")
    manager = CheckpointManager(tmp_path, CheckpointPolicy("loss", "min", top_k=1, every_steps=1), is_main=True,
                                suffix="", lean=lean, lean_suffix=".pt")
    for step, loss in [(1, 3.0), (2, 2.0)]:
        manager.save(lambda p, s=step: write(p, s), step, {"loss": loss})
    assert (tmp_path / "latest").is_dir() and (tmp_path / "periodic" / "step_00000002").is_dir()
    assert [p.name for p in (tmp_path / "topk").iterdir()] == ["step_00000002.pt"]
    best = tmp_path / "best.pt"
    assert best.stat().st_ino == (tmp_path / "topk" / "step_00000002.pt").stat().st_ino
    assert "optimizer" not in safe_load(best) and not (tmp_path / "best").exists()
