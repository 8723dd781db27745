"""The sharded identity head (Partial FC) under DeepSpeed ZeRO 1/2: its rows beside the
engine (dist_train/strategies/deepspeed_rows.py). Two torchrun ranks, gloo, CPU.

The runs follow DDP with the same sharded head over the same steps (the setting of
tests/dist_train/test_deepspeed.py: fp32, SGD with momentum, active clipping, warmup +
cosine, a short last window), which shows the rows are neither broadcast from rank 0
nor averaged, that they step with the engine's LR and the global clipping norm; a
ZeRO-1 run stopped at step 3 resumes on two ranks to DDP's weights (the rows'
momentum came back); export holds the whole head. Another world size is DeepSpeed's
limit (ZeRO cannot re-partition its optimizer state): one line at start.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dist_train.checkpoint import safe_load
from dist_train.config import ConfigError
from dist_train.preflight import load_checked_config
from tests.conftest import PYTHON, REPO, tiny_overrides
from tests.dist_train.test_deepspeed import COMMON, _ds, _rows, _run_dir

pytestmark = pytest.mark.integration

CONFIG = REPO / "configs" / "facecom.yaml"
IDENTITIES = 8  # tiny_overrides' synthetic identities
HEAD = "identity_head.weight"
# sample_rate 0.5: the negatives drawn from (seed, draws, rank) are the same under both strategies
SHARDED = {**COMMON, "recipe__params__identity_head_sharding": "partial_fc", "recipe__params__sample_rate": 0.5,
           "recipe__params__backbone": "resnet18"}


# Bounds. The runs differ only in float32 summation order (DDP's bucketed all-reduce vs ZeRO's
# flat reduce-scatter), which the margin softmax amplifies along the trajectory: up to 2.4e-5
# relative in a logged value by step 5 (more than tests/dist_train/test_deepspeed.py's plain
# heads, 2.3e-6). The bounds sit between that noise and what the wrong versions move, none of
# which a dtype bound can know: the rows broadcast from rank 0 or averaged over ranks (other
# identities' centres: O(1)), stepped without the global clipping norm (the step-2 loss 21.7 vs
# 18.0, found this way in the DDP path), at a stale LR after a resume (1.2e-3 in the head, found
# this way), at the next step's LR (2x in the warmup), or resumed
# without their momentum (weights off by ~lr x momentum x the clipped update, ~1e-3).
LOGGED_RTOL = 1e-3
WEIGHT_ATOL = 1e-4


def _launch(tmp: Path, *extra: str, ranks: int = 2, **overrides: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "dist_train/main.py",
           "--config", str(CONFIG), *tiny_overrides(tmp, **{**SHARDED, **overrides}), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _model(path: Path) -> dict[str, torch.Tensor]:
    return safe_load(path)["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pfc_ds")
    out = {}
    for name, overrides in (("ddp", {}), ("zero2", _ds("zero2.json"))):
        _launch(base / name, **overrides)
        out[name] = _run_dir(base / name)
    part = base / "zero1"
    _launch(part, train__stop_at_step=3, **_ds("zero1.json"))
    step3 = base / "zero1-step3"
    shutil.copytree(_run_dir(part) / "checkpoints" / "latest", step3)
    _launch(part, "--resume", "latest", **_ds("zero1.json"))
    out["zero1_resumed"] = _run_dir(part)
    out["step3"] = step3
    return out


def test_zero2_follows_ddp_with_the_sharded_head(runs: dict[str, Path]) -> None:
    ddp, ours = _rows(runs["ddp"]), _rows(runs["zero2"])
    assert [int(r["step"]) for r in ours] == [int(r["step"]) for r in ddp] == [1, 2, 3, 4, 5]
    assert float(ddp[0]["grad_norm"]) > COMMON["train__grad_clip"]  # clipping was active
    for key in ("loss", "identity", "grad_norm"):  # the norm: the rows counted once over both ranks
        assert [float(r[key]) for r in ours] == pytest.approx([float(r[key]) for r in ddp], rel=LOGGED_RTOL), key
    assert [float(r["lr"]) for r in ours] == [float(r["lr"]) for r in ddp]
    theirs, mine = _model(runs["ddp"] / "model.pt"), _model(runs["zero2"] / "model.pt")
    assert mine.keys() == theirs.keys() and mine[HEAD].shape[0] == IDENTITIES  # every centre, in one file
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], atol=WEIGHT_ATOL, rtol=0, msg=key)


def test_the_checkpoint_exports_the_whole_head(runs: dict[str, Path], tmp_path: Path) -> None:
    from dist_train.export import export_checkpoint

    exported = _model(export_checkpoint(runs["zero2"] / "checkpoints" / "latest", tmp_path / "x.pt"))
    live = _model(runs["zero2"] / "model.pt")
    assert exported.keys() == live.keys()
    for key in live:
        assert torch.equal(exported[key], live[key]), key


def test_zero1_resumes_on_two_ranks_to_ddps_weights(runs: dict[str, Path]) -> None:
    rows = _rows(runs["zero1_resumed"])
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    theirs, mine = _model(runs["ddp"] / "model.pt"), _model(runs["zero1_resumed"] / "model.pt")
    # a resume that lost the rows' momentum moves them by ~lr x momentum (1e-2): far outside the bound
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], atol=WEIGHT_ATOL, rtol=0, msg=key)


def test_another_world_size_is_one_line_before_anything_starts(runs: dict[str, Path], tmp_path: Path) -> None:
    """ZeRO cannot re-partition its optimizer state (DeepSpeed's limit, not the head's:
    a DDP checkpoint of the sharded head resumes at any world size)."""
    cmd = [PYTHON, "dist_train/main.py", "--config", str(CONFIG), "--resume", str(runs["step3"]),
           *tiny_overrides(tmp_path, **{**SHARDED, **_ds("zero1.json")})]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "a ZeRO checkpoint of 2 ranks; DeepSpeed cannot re-partition its optimizer state for 1" in lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("extra, fragment", [
    (dict(train__strategy="fsdp"), "works with train.strategy=ddp or deepspeed (ZeRO stage 1 or 2); fsdp"),
    (_ds("zero3.json"), "has stage 3: stage 0 averages"),
    (_ds("zero0.json"), "has stage 0: stage 0 averages the rows' gradients"),
])
def test_strategies_that_cannot_keep_the_rows_are_refused_at_start(tmp_path: Path, extra: dict,
                                                                   fragment: str) -> None:
    overrides = tiny_overrides(tmp_path, recipe__params__identity_head_sharding="partial_fc", **extra)
    with pytest.raises(ConfigError) as info:
        load_checked_config(CONFIG, overrides)
    assert fragment in str(info.value)
    assert not (tmp_path / "runs").exists()
