"""End-to-end runs of the trainer: accumulation equivalence, exact resume, torchrun with 2 ranks."""
from __future__ import annotations

import csv
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from dist_train.checkpoint import safe_load
from dist_train.config import load_config
from dist_train.main import train
from tests.conftest import PYTHON, REPO, tiny_overrides

pytestmark = pytest.mark.integration  # torchrun / DeepSpeed / SLURM / full training runs

CONFIG = REPO / "configs" / "facecom.yaml"


def _run(tmp_path: Path, resume: Path | None = None, **overrides: object) -> Path:
    cfg = load_config(CONFIG, tiny_overrides(tmp_path, **overrides))
    train(cfg, resume)
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return safe_load(run_dir / "checkpoints" / "latest.pt")["model"]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_accumulation_matches_a_bigger_batch(tmp_path: Path) -> None:
    """8 x accum 1 and 4 x accum 2 give the same weights after one optimizer step
    (a LayerNorm ViT: batch norm would make the two legitimately differ; SGD,
    because Adam's first step is g/|g| and turns 1e-10 float noise on a
    zero-gradient parameter, such as a key bias, into a full lr-sized step)."""
    common = dict(recipe__params__backbone="vit_tiny_patch16_224", recipe__params__img_size=32,
                  recipe__params__embedding_norm="none", recipe__params__dropout=0.0,
                  train__max_steps=1, train__grad_clip=0.0, train__optimizer="sgd", train__lr=0.05,
                  train__momentum=0.0, train__weight_decay=0.0)
    big = _run(tmp_path / "big", data__batch_size=8, train__grad_accum=1, **common)
    small = _run(tmp_path / "small", data__batch_size=4, train__grad_accum=2, **common)
    initial = _run(tmp_path / "init", data__batch_size=8, **{**common, "train__lr": 1e-12})
    a, b, w0 = _weights(big), _weights(small), _weights(initial)
    moved = max(float((a[k].float() - w0[k].float()).abs().max()) for k in a if a[k].is_floating_point())
    assert moved > 1e-4  # the step really changed the weights
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_ends_with_the_same_weights(tmp_path: Path, workers: int) -> None:
    """Stop mid-epoch at step 5 of 12 (the schedule is that of the full run),
    resume, and compare with an uninterrupted run: identical weights and logs.
    With 2 DataLoader workers, kept alive across the epochs of each run and
    told each epoch (and the resume point) through set_epoch."""
    common = dict(train__max_steps=12, train__val_every_steps=4, train__scheduler__warmup_steps=2,
                  data__num_workers=workers)
    full = _run(tmp_path / "full", **common)
    part = _run(tmp_path / "part", train__stop_at_step=5, **common)
    assert safe_load(part / "checkpoints" / "latest.pt")["client"]["loop"]["step"] == 5
    cfg = load_config(CONFIG, tiny_overrides(tmp_path / "part", **common))
    train(cfg, part / "checkpoints" / "latest.pt")
    a, b = _weights(full), _weights(part)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [int(r["step"]) for r in _rows(part / "logs" / "train_logs.csv")]
    assert steps == list(range(1, 13))  # no step lost or repeated
    full_losses = [float(r["loss"]) for r in _rows(full / "logs" / "train_logs.csv")]
    part_losses = [float(r["loss"]) for r in _rows(part / "logs" / "train_logs.csv")]
    assert part_losses == pytest.approx(full_losses, abs=1e-6)


def test_torchrun_two_ranks_bf16_with_accumulation(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "dist_train/main.py", "--config", "configs/facecom.yaml",
           *tiny_overrides(tmp_path, train__precision="bf16", train__grad_accum=2, train__max_steps=3,
                           checkpoint__every_steps=2)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1  # one run directory for both ranks
    run = runs[0]
    rows = _rows(run / "logs" / "train_logs.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1  # rank 0 only
    assert (run / "checkpoints" / "latest.pt").exists()
    assert (run / "checkpoints" / "periodic" / "step_00000002.pt").exists()
    assert safe_load(run / "checkpoints" / "latest.pt")["client"]["loop"]["step"] == 3
    assert len(safe_load(run / "checkpoints" / "latest.pt")["client"]["rng"]) == 2  # one RNG state per rank
    assert (run / "config.yaml").exists() and (run / "logs" / "validation_logs.csv").exists()
