"""DeepSpeed and FSDP best / top-k checkpoints hold the weights only (issue 27, point 7).

A one-rank ZeRO-2 or FSDP2 run (torchrun, gloo, CPU): ``checkpoints/latest`` keeps
the strategy's folder with its optimizer partitions / shards (what ``--resume``
needs); ``topk/*.pt``
are files of consolidated fp32 weights with the client state, ``best.pt`` a
hard link to one of them, as in a DDP run. ``--resume`` of one is refused in
one line naming ``latest``; ``biomtl eval`` and ``biomtl export`` read it."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from dist_train.checkpoint import safe_load
from dist_train.config import ConfigError
from dist_train.main import resolve_resume
from dist_train.preflight import load_checked_config
from tests.conftest import PYTHON, REPO, tiny_overrides

pytestmark = pytest.mark.integration  # a DeepSpeed training run and CLI commands in subprocesses

FACECOM = REPO / "configs" / "facecom.yaml"


STRATEGIES = {"deepspeed": dict(train__strategy="deepspeed",
                                deepspeed__config=str(REPO / "configs" / "deepspeed" / "zero2.json")),
              "fsdp": dict(train__strategy="fsdp")}
OPTIMIZER_FILES = {"deepspeed": "*optim_states.pt", "fsdp": "*.distcp"}


def _overrides(tmp_path: Path, strategy: str) -> list[str]:
    return tiny_overrides(tmp_path, logging__tracking="none", **STRATEGIES[strategy], data__batch_size=4,
                          train__max_steps=3, train__val_every_steps=1, checkpoint__top_k=2,
                          checkpoint__every_steps=1)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([PYTHON, "-m", "dist_train.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


@pytest.mark.parametrize("strategy", ["deepspeed", "fsdp"])
def test_best_and_topk_are_weights_only_files(tmp_path: Path, strategy: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           "dist_train/main.py", "--config", str(FACECOM), *_overrides(tmp_path, strategy)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    ckpt = run / "checkpoints"
    latest, best = ckpt / "latest", ckpt / "best.pt"
    assert latest.is_dir() and list(latest.rglob(OPTIMIZER_FILES[strategy]))  # latest resumes
    assert not (ckpt / "best").exists()
    top = {p.stat().st_ino: p for p in (ckpt / "topk").iterdir()}
    assert len(top) == 2 and all(p.is_file() and p.suffix == ".pt" for p in top.values())
    assert best.is_file() and best.stat().st_ino in top                       # one file, two names
    kept = safe_load(best)
    assert set(kept) == {"model", "client", "format_version"}                 # no optimizer, scheduler...
    step = kept["client"]["loop"]["step"]
    assert top[best.stat().st_ino].name == f"step_{step:08d}.pt"
    assert all(v.dtype == torch.float32 for v in kept["model"].values() if v.is_floating_point())
    # the same weights as the full checkpoint of that step, consolidated by export
    full = tmp_path / "full.pt"
    assert _cli("export", "--checkpoint", str(ckpt / "periodic" / f"step_{step:08d}"),
                "--output", str(full)).returncode == 0
    reference = safe_load(full)["model"]
    assert reference.keys() == kept["model"].keys()
    assert all(torch.equal(reference[k], kept["model"][k]) for k in reference)
    assert _size(best) < 0.6 * _size(latest)                                  # AdamW: two moments per weight

    cfg = load_checked_config(FACECOM, _overrides(tmp_path, strategy))
    with pytest.raises(ConfigError, match=r"best / top-k checkpoint .* resume from RUN/checkpoints/latest\b") as err:
        resolve_resume(cfg, str(best))
    assert "\n" not in str(err.value)

    exported = _cli("export", "--checkpoint", str(best), "--output", str(tmp_path / "best_model.pt"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert all(torch.equal(safe_load(tmp_path / "best_model.pt")["model"][k], kept["model"][k]) for k in reference)
    evaluated = _cli("eval", "--checkpoint", str(best), "--split", "train", "--output", str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert (tmp_path / "eval" / "metrics.json").is_file()
