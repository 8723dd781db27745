"""Files read once at the start of a run (``recipe.params.init_from``,
``weights_path``) are not needed once the run has a checkpoint: after they are
deleted (a scratch clean-up), ``biomtl export``, ``--resume`` of the same run
(DDP and DeepSpeed) and the inference commands on its files still work, and
nothing tries to read them again."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from dist_train.config import load_config, recipe_params
from recipes.base import DataInfo, get_recipe
from tests.conftest import PYTHON, REPO, tiny_overrides

pytestmark = pytest.mark.integration  # full (tiny) training runs in subprocesses

FACECOM = REPO / "configs" / "facecom.yaml"
DS_CONFIGS = REPO / "configs" / "deepspeed"


def _start_file(tmp_path: Path, field: str, overrides: list[str]) -> Path:
    """The file a run starts from, made here: a facecom ``model.pt`` (``init_from``,
    the heads of another size so they are skipped) or the backbone's own
    weights (``weights_path``)."""
    cfg = load_config(FACECOM, overrides)
    info = DataInfo(identities=("a", "b", "c"), twin_pairs=(), label_schemas={}, modalities=("png", "json"))
    torch.manual_seed(3)
    model = get_recipe("facecom")(recipe_params(cfg), info).build_model()
    folder = tmp_path / "scratch"
    folder.mkdir()
    if field == "init_from":
        path = folder / "model.pt"
        torch.save({"model": model.state_dict(), "config": {"recipe": {"name": "facecom"}}, "data_info": {}}, path)
    else:
        from models.backbones import build_backbone

        path = folder / "backbone.pth"
        torch.save(build_backbone(cfg.recipe.params["backbone"], False)[0].state_dict(), path)
    return path


def _train(overrides: list[str], *extra: str, nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = ([PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [PYTHON])
    return subprocess.run([*launcher, "dist_train/main.py", "--config", str(FACECOM), *extra, *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([PYTHON, "-m", "dist_train.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def _only_run(tmp_path: Path) -> Path:
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def _check_gone_file_is_not_needed(tmp_path: Path, start: Path, overrides: list[str], latest: Path,
                                   nproc: int = 1) -> Path:
    run = _only_run(tmp_path)
    start.unlink()  # the scratch clean-up
    exported = tmp_path / "exported.pt"
    proc = _cli("export", "--checkpoint", str(latest), "--output", str(exported))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert exported.is_file()
    proc = _train(overrides, "--resume", str(latest), nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _only_run(tmp_path) == run and (run / "model.pt").is_file()
    assert "path does not exist" not in proc.stderr
    return run


def _check_inference(tmp_path: Path, run: Path) -> None:
    from PIL import Image

    from dist_train.inference import InferenceEngine

    for source in (run / "model.pt", run / "checkpoints" / "latest.pt", tmp_path / "exported.pt"):
        engine = InferenceEngine.from_checkpoint(source, "cpu")
        assert engine.extract_features([Image.new("RGB", (32, 32), (90, 60, 30))]).shape[0] == 1
    faces = [tmp_path / f"face{i}.png" for i in range(2)]
    for i, face in enumerate(faces):
        Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(face)
    proc = _cli("verify", "--checkpoint", str(run / "model.pt"), str(faces[0]), str(faces[1]), "--device", "cpu",
                "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = next((tmp_path.parent / "synthetic-cache").glob("synthetic-*"))
    proc = _cli("eval", "--checkpoint", str(run / "model.pt"), "--data", str(data), "--output",
                str(tmp_path / "eval"), "--split", "train", "--device", "cpu", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("field", ["init_from", "weights_path"])
def test_ddp_export_resume_and_inference_after_the_start_file_is_gone(tmp_path: Path, field: str) -> None:
    base = tiny_overrides(tmp_path, logging__tracking="none")
    start = _start_file(tmp_path, field, base)
    overrides = base + [f"recipe.params.{field}={start}"]
    proc = _train(overrides + ["train.stop_at_step=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    latest = _only_run(tmp_path) / "checkpoints" / "latest.pt"
    run = _check_gone_file_is_not_needed(tmp_path, start, overrides, latest)
    _check_inference(tmp_path, run)


def test_deepspeed_export_and_resume_after_init_from_is_gone(tmp_path: Path) -> None:
    base = tiny_overrides(tmp_path, logging__tracking="none", train__strategy="deepspeed",
                          deepspeed__config=str(DS_CONFIGS / "zero2.json"), data__batch_size=4,
                          train__max_steps=4)
    start = _start_file(tmp_path, "init_from", base)
    overrides = base + [f"recipe.params.init_from={start}"]
    proc = _train(overrides + ["train.stop_at_step=2"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_gone_file_is_not_needed(tmp_path, start, overrides, _only_run(tmp_path) / "checkpoints" / "latest",
                                   nproc=2)
