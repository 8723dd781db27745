"""The checkpoint policy across a resume and with NaN metrics: the state saved
in a checkpoint already counts that checkpoint's own metric, so a resumed run
keeps exactly the best / top-k files an uninterrupted one keeps; a NaN metric
never becomes best (nor pins it when an older run stored one) and best.json
stays valid JSON."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dist_train.checkpoint import CheckpointManager, CheckpointPolicy, safe_load
from dist_train.config import load_config
from tests.conftest import REPO, tiny_overrides

# min mode, top 2: step 3 pushes step 1 out, step 5 then pushes step 2 out
VALUES = {1: 5.0, 2: 4.0, 3: 3.0, 4: 6.0, 5: 3.5, 6: 7.0}


def _manager(folder: Path, top_k: int = 2) -> CheckpointManager:
    manager = CheckpointManager(folder, CheckpointPolicy("loss", "min", top_k=top_k, every_steps=0), is_main=True)
    manager.prepare()
    return manager


def _save(manager: CheckpointManager, step: int, value: float | None) -> None:
    # what the trainer stores: the policy state as the manager hands it to the writer
    manager.save(lambda p: torch.save({"step": step, "policy": manager.policy_state()}, p), step,
                 None if value is None else {"loss": value})


def _files(folder: Path) -> dict[str, int]:
    out = {p.name: safe_load(p)["step"] for p in sorted((folder / "topk").iterdir())}
    out["best"] = safe_load(folder / "best.pt")["step"]
    return out


def _strict_json(path: Path):
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_the_saved_policy_state_counts_the_checkpoints_own_metric(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    for step in (1, 2, 3):
        _save(manager, step, VALUES[step])
    saved = safe_load(tmp_path / "latest.pt")["policy"]
    assert saved["best_value"] == 3.0
    assert [name for _, name in saved["top"]] == ["step_00000003.pt", "step_00000002.pt"]


def test_resumed_policy_keeps_the_same_files_as_an_uninterrupted_run(tmp_path: Path) -> None:
    whole = _manager(tmp_path / "whole")
    for step in sorted(VALUES):
        _save(whole, step, VALUES[step])
    part = _manager(tmp_path / "part")
    for step in (1, 2, 3):
        _save(part, step, VALUES[step])
    resumed = _manager(tmp_path / "part")  # a new process, state from the checkpoint
    resumed.load_policy_state(safe_load(tmp_path / "part" / "latest.pt")["policy"])
    for step in (4, 5, 6):
        _save(resumed, step, VALUES[step])
    assert _files(tmp_path / "part") == _files(tmp_path / "whole") == {
        "step_00000003.pt": 3, "step_00000005.pt": 5, "best": 3}
    assert _strict_json(tmp_path / "part" / "best.json") == _strict_json(tmp_path / "whole" / "best.json")


def test_nan_never_becomes_best_and_best_json_stays_json(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    _save(manager, 1, math.nan)
    assert not (tmp_path / "best.pt").exists() and not list((tmp_path / "topk").iterdir())
    assert _strict_json(tmp_path / "best.json")["best"] is None
    _save(manager, 2, 4.0)
    _save(manager, 3, math.nan)
    assert _files(tmp_path) == {"step_00000002.pt": 2, "best": 2}
    report = _strict_json(tmp_path / "best.json")
    assert report["best"] == 4.0 and report["top_k"] == [[4.0, "step_00000002.pt"]]


def test_a_nan_best_of_an_older_run_does_not_pin_best(tmp_path: Path) -> None:
    """What a checkpoint of an older biomtl holds after a NaN validation."""
    manager = _manager(tmp_path)
    (tmp_path / "topk" / "step_00000001.pt").write_bytes(b"an older run's NaN checkpoint")
    manager.load_policy_state({"best_value": math.nan, "top": [[math.nan, "step_00000001.pt"]]})
    _save(manager, 2, 4.0)
    _save(manager, 3, 5.0)
    assert _files(tmp_path) == {"step_00000002.pt": 2, "step_00000003.pt": 3, "best": 2}
    assert _strict_json(tmp_path / "best.json")["best"] == 4.0


def test_a_failed_save_leaves_the_policy_as_it_was(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    _save(manager, 1, 5.0)

    def fail(path: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        manager.save(fail, 2, {"loss": 1.0})
    assert manager.policy_state() == {"best_value": 5.0, "top": [[5.0, "step_00000001.pt"]]}
    assert _files(tmp_path) == {"step_00000001.pt": 1, "best": 1}


@pytest.mark.integration  # three short training runs
def test_a_resumed_run_ends_with_the_best_and_topk_files_of_an_uninterrupted_one(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """The trainer with scripted validation values (the weights are really trained):
    same top-k steps, same best step, same weights in each of those files."""
    from dist_train.main import train
    from dist_train.trainer import Trainer

    monkeypatch.setattr(Trainer, "validate", lambda self, logger: {"loss": VALUES[self.state.step]})
    common = dict(train__max_steps=6, train__val_every_steps=1, checkpoint__top_k=2, checkpoint__monitor="loss",
                  checkpoint__mode="min")
    config = REPO / "configs" / "facecom.yaml"

    def run(where: Path, resume: Path | None = None, **extra: object) -> Path:
        train(load_config(config, tiny_overrides(where, **common, **extra)), resume)
        (run_dir,) = (where / "runs").iterdir()
        return run_dir / "checkpoints"

    whole = run(tmp_path / "whole")
    part = run(tmp_path / "part", train__stop_at_step=3)
    run(tmp_path / "part", part / "latest.pt")

    def kept(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
        files = [folder / "best.pt", *sorted((folder / "topk").iterdir())]
        return {p.name: (safe_load(p)["client"]["loop"]["step"], safe_load(p)["model"]) for p in files}

    a, b = kept(whole), kept(part)
    assert sorted(a) == sorted(b) == ["best.pt", "step_00000003.pt", "step_00000005.pt"]
    for name in a:
        assert a[name][0] == b[name][0], name
        for key, tensor in a[name][1].items():
            assert torch.equal(tensor, b[name][1][key]), (name, key)
