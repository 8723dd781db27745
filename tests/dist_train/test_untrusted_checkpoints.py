"""Checkpoints are untrusted input: a crafted DeepSpeed-layout directory never
runs code (``biomtl export`` of the directory or of its run directory,
``--resume`` with the DeepSpeed strategy), and a file that is not a biomtl
checkpoint is one line naming it and the cause, exit 2, nothing written.

The crafted files pickle an object whose ``__reduce__`` opens (creates) a
marker file: any unpickling beyond weights-only creates it.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from dist_train.commands import export_cmd
from dist_train.strategies.deepspeed import TAG
from recipes.model_file import deepspeed_client, deepspeed_client_state
from tests.conftest import PYTHON, REPO, tiny_overrides

MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class CreatesMarker:
    """Unpickled by anything but a weights-only load, this creates ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _client() -> dict:
    """A real run's self-description (the export rebuilds the recipe from it)."""
    from dist_train.config import load_config, resolved_config_dict
    from shards.manifest import DataInfo

    cfg = load_config(REPO / "configs" / "facecom.yaml")
    info = DataInfo(identities=("a", "b"), twin_pairs=(), label_schemas={}, modalities=("vis.png",))
    return {"config": resolved_config_dict(cfg), "data_info": info.to_dict()}


def _model_states(stage: int) -> dict:
    # the keys DeepSpeed (engine and zero_to_fp32) reads from a model-states file
    return {"module": {"w": torch.ones(2)}, "buffer_names": [], "param_shapes": [{"w": torch.Size([2])}],
            "shared_params": {}, "ds_version": "0.19.8", "ds_config": {"zero_optimization": {"stage": stage}},
            **deepspeed_client_state(_client())}


def ds_checkpoint(ckpt: Path, marker: Path | None, where: str = "model_states") -> Path:
    """A DeepSpeed-layout checkpoint directory as DeepSpeedStrategy.save_checkpoint
    writes it (``latest`` naming the tag folder ``state/``), with the marker
    object pickled into the model states or the ZeRO optimizer states."""
    (ckpt / TAG).mkdir(parents=True)
    (ckpt / "latest").write_text(TAG)
    states = _model_states(stage=0 if where == "model_states" else 2)
    if marker is not None and where == "model_states":
        deepspeed_client(states)["payload"] = CreatesMarker(marker)
    torch.save(states, ckpt / TAG / MODEL_STATES)
    if where == "optim_states":
        torch.save({"optimizer_state_dict": {"zero_stage": 2, "partition_count": 1,
                                             "loss_scaler": CreatesMarker(marker) if marker else None}},
                   ckpt / TAG / OPTIM_STATES)
    return ckpt


def _one_error_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("error: "), text
    return lines[0]


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


# ---------------------------------------------------------------------------
# biomtl export of a crafted DeepSpeed directory / of its run directory


@pytest.mark.parametrize("where", ["model_states", "optim_states"])
@pytest.mark.parametrize("via_run_dir", [False, True], ids=["checkpoint_dir", "run_dir"])
def test_export_refuses_a_crafted_deepspeed_directory(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      where: str, via_run_dir: bool) -> None:
    marker = tmp_path / "MARKER"
    run = tmp_path / "run"
    ckpt = ds_checkpoint(run / "checkpoints" / "latest", marker, where)
    bad_file = ckpt / TAG / (MODEL_STATES if where == "model_states" else OPTIM_STATES)
    out = tmp_path / "exported.pt"
    rc = export_cmd.run(["--checkpoint", str(run if via_run_dir else ckpt), "--output", str(out)])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert not marker.exists()
    assert str(bad_file) in line and "refused" in line and "io.open" in line, line
    assert not out.exists() and not list(tmp_path.glob(".exported*"))


def test_export_of_the_same_directory_without_the_object_works(tmp_path: Path) -> None:
    """The crafted layout is a valid checkpoint otherwise: the refusal above is the pickled object's."""
    ckpt = ds_checkpoint(tmp_path / "ckpt", None)
    out = tmp_path / "exported.pt"
    assert export_cmd.run(["--checkpoint", str(ckpt), "--output", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    assert torch.equal(state["model"]["w"], torch.ones(2)) and state["config"] == _client()["config"]


def test_export_refuses_a_tag_that_leaves_the_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """DeepSpeed joins the ``latest`` tag to the directory: ``../x`` would load files the check never saw."""
    elsewhere = ds_checkpoint(tmp_path / "elsewhere", tmp_path / "MARKER")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest").write_text(f"../elsewhere/{TAG}")
    assert export_cmd.run(["--checkpoint", str(ckpt), "--output", str(tmp_path / "x.pt")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "does not name a checkpoint folder inside" in line, line
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "x.pt").exists() and elsewhere.is_dir()


def test_deepspeed_loads_are_weights_only_inside_the_guard(tmp_path: Path) -> None:
    """DeepSpeed's own torch.load(weights_only=False) calls, made inside
    weights_only_loads() (export's zero_to_fp32, the engine's resume), are
    weights-only: a file swapped in after the pre-check still runs nothing."""
    from dist_train.strategies.deepspeed import weights_only_loads

    marker = tmp_path / "MARKER"
    torch.save({"x": CreatesMarker(marker)}, tmp_path / "evil.pt")
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    with weights_only_loads():
        with pytest.raises(Exception, match="Weights only load failed"):
            torch.load(tmp_path / "evil.pt", weights_only=False)
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before


def test_the_classes_deepspeed_pickles_load_weights_only(tmp_path: Path) -> None:
    """What DeepSpeed 0.19 writes besides tensors and containers (ZeRO 1/2/3 and
    bf16/fp16 optimizer states: loss scalers, the ZeRO stage enum, fragment
    addresses) passes the check; real checkpoints: tests/dist_train/test_deepspeed.py."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from dist_train.strategies.deepspeed import checked_tag_dir, load_checkpoint_file

    ckpt = ds_checkpoint(tmp_path / "ckpt", None)
    optim = {"optimizer_state_dict": {
        "loss_scaler": LossScaler(1.0), "dynamic": DynamicLossScaler(2.0 ** 16, 1000, 1.0, 2, False),
        "zero_stage": ZeroStageEnum.gradients, "param_slice_mappings": [{"w": fragment_address(numel=2, start=0)}],
        "single_partition_of_fp32_groups": [torch.ones(2)]}}
    torch.save(optim, ckpt / TAG / OPTIM_STATES)
    assert checked_tag_dir(ckpt) == ckpt / TAG
    loaded = load_checkpoint_file(ckpt / TAG / OPTIM_STATES)["optimizer_state_dict"]
    assert loaded["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["dynamic"].cur_scale == 2.0 ** 16 and loaded["dynamic"].dtype == torch.half
    assert loaded["param_slice_mappings"][0]["w"] == fragment_address(numel=2, start=0)


# ---------------------------------------------------------------------------
# --resume with train.strategy=deepspeed


@pytest.mark.parametrize("resume", ["path", "latest"])
def test_resume_refuses_a_crafted_deepspeed_directory(tmp_path: Path, resume: str) -> None:
    marker = tmp_path / "MARKER"
    runs = tmp_path / "runs"
    ckpt = ds_checkpoint(runs / "facecom_20260101-000000" / "checkpoints" / "latest", marker)
    before = _tree(tmp_path)
    # LOCAL_RANK: DeepSpeed's engine insists on it outside its launchers; with
    # it the unguarded code went on to build the engine and load the file.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOCAL_RANK": "0"}
    proc = subprocess.run(
        [PYTHON, "-m", "dist_train.cli", "train", "--config", str(REPO / "configs" / "facecom.yaml"),
         "--resume", str(ckpt) if resume == "path" else "latest",
         *tiny_overrides(tmp_path, train__strategy="deepspeed",
                         deepspeed__config=str(REPO / "configs" / "deepspeed" / "zero0.json"),
                         logging__tracking="none")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    line = _one_error_line(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert str(ckpt / TAG / MODEL_STATES) in line and "refused" in line, line
    assert not marker.exists()
    assert _tree(tmp_path) == before  # no run directory, no config.yaml, no data cache


# ---------------------------------------------------------------------------
# biomtl export of files that are not biomtl checkpoints


def _good_checkpoint(path: Path) -> None:
    torch.save({"model": {"w": torch.ones(3)}, "client": _client()}, path)


def _truncated(path: Path) -> None:
    _good_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# kind -> (write the file, the cause its error line names)
BAD_FILES = {
    "empty": (lambda p: p.write_bytes(b""), "empty file"),
    "truncated": (_truncated, "truncated or corrupt"),
    "text": (lambda p: p.write_text("root:x:0:0:root:/root:/bin/bash\n"), "not a PyTorch checkpoint file"),
    "a_list": (lambda p: torch.save([1, 2], p), "not a biomtl checkpoint (no 'model')"),
    "no_config": (lambda p: torch.save({"model": {"w": torch.ones(1)}}, p), "has no config"),
    "model_not_tensors": (lambda p: torch.save({"model": [1], "client": _client()}, p),
                          "not a state dict of tensors"),
    "pickled_code": (lambda p: torch.save({"model": CreatesMarker(p.parent / "MARKER")}, p),
                     "refused: it pickles io.open"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_export_of_a_bad_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, kind: str) -> None:
    make, cause = BAD_FILES[kind]
    path = tmp_path / "checkpoint.pt"
    make(path)
    out = tmp_path / "out" / "model.pt"
    rc = export_cmd.run(["--checkpoint", str(path), "--output", str(out)])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert str(path) in line and cause in line, line
    assert "root:x" not in line  # never the file's bytes
    assert not out.exists() and not (tmp_path / "MARKER").exists()


def test_export_of_the_complete_file_works(tmp_path: Path) -> None:
    """Control for the truncated case: the same file, whole, exports."""
    out = tmp_path / "model.pt"
    _good_checkpoint(tmp_path / "c.pt")
    assert export_cmd.run(["--checkpoint", str(tmp_path / "c.pt"), "--output", str(out)]) == 0
    assert torch.equal(torch.load(out, weights_only=True)["model"]["w"], torch.ones(3))
