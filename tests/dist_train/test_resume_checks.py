"""--resume is checked before anything is created or written: a checkpoint of
another recipe, optimizer, model shape or strategy layout, or a file that is no
training checkpoint, is one ``ConfigError`` line (exit 2) and the source run is
left as it was; a checkpoint outside a run's ``checkpoints/`` starts a new run
directory; a changed schedule is applied with a warning naming the change."""
from __future__ import annotations

import csv
import logging
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dist_train.config import ConfigError, load_config, resolved_config_dict
from dist_train.main import resolve_resume, run_dir_for
from dist_train.preflight import load_checked_config
from recipes.base import get_recipe
from shards.manifest import Manifest
from shards.synthetic import SyntheticSpec, ensure_synthetic
from tests.conftest import PYTHON, REPO, tiny_overrides

FACECOM = REPO / "configs" / "facecom.yaml"
DCAL = REPO / "configs" / "dcal_twins.yaml"


def _tiny(tmp_path: Path, *extra: str, **overrides: object) -> list[str]:
    return tiny_overrides(tmp_path, **overrides) + list(extra)


def _data_info(cfg):
    s = cfg.data.synthetic
    spec = SyntheticSpec(num_identities=s.num_identities, samples_per_identity=s.samples_per_identity,
                         twin_fraction=s.twin_fraction, image_size=s.image_size, split_by=s.split_by,
                         modalities=tuple(s.modalities), seed=cfg.experiment.seed)
    return Manifest.load(ensure_synthetic(Path(s.cache_dir), spec)).data_info()


def _fake_checkpoint(cfg, path: Path, data_info=None) -> Path:
    """What the DDP strategy saves, for ``cfg`` (no training needed to check a resume)."""
    from dist_train.config import recipe_params

    data_info = data_info or _data_info(cfg)
    model = get_recipe(cfg.recipe.name)(recipe_params(cfg), data_info).build_model()
    client = {"config": resolved_config_dict(cfg), "data_info": data_info.to_dict(), "total_steps": 4,
              "loop": {"step": 2, "epoch": 0, "batch_in_epoch": 2, "samples_seen": 16},
              "checkpoint_policy": {"best_value": None, "top": []}, "rng": []}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "scaler": {}, "client": client}, path)
    return path


def _fake_run(tmp_path: Path) -> Path:
    cfg = load_config(FACECOM, _tiny(tmp_path))
    run = tmp_path / "runs" / "facecom_20250101-000000"
    _fake_checkpoint(cfg, run / "checkpoints" / "latest.pt")
    (run / "config.yaml").write_text("the source run's own config\n")
    return run


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"" for p in sorted(root.rglob("*"))}


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


def test_checkpoint_of_another_recipe_is_one_line_and_leaves_the_run_untouched(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    before = _tree(tmp_path / "runs")
    proc = subprocess.run([PYTHON, "dist_train/main.py", "--config", str(DCAL), "--resume",
                           str(run / "checkpoints" / "latest.pt"), f"experiment.output_dir={tmp_path / 'runs'}",
                           f"data.synthetic.cache_dir={tmp_path / 'cache'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    assert "recipe 'facecom'" in line and "recipe.name is 'dcal_twins'" in line
    assert _tree(tmp_path / "runs") == before  # config.yaml not overwritten, no new run directory
    assert not (tmp_path / "cache").exists()


def test_checkpoint_of_another_model_shape_names_a_parameter(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    cfg = load_checked_config(FACECOM, _tiny(tmp_path, "recipe.params.embedding_dim=64"))
    with pytest.raises(ConfigError) as info:
        resolve_resume(cfg, str(run / "checkpoints" / "latest.pt"))
    message = str(info.value)
    assert "\n" not in message
    assert "does not fit the facecom model" in message and "[128, " in message and "[64, " in message


def test_checkpoint_trained_on_other_identities_does_not_fit(tmp_path: Path) -> None:
    """The identity head follows the data: shards with 6 identities vs a checkpoint of 8."""
    from shards.cli import run as shards_run

    run = _fake_run(tmp_path)
    shards = tmp_path / "six"
    assert shards_run(["create", "--format", "synthetic", "--output", str(shards), "--identities", "6",
                       "--samples", "6", "--size", "32", "--split-by", "sample", "--workers", "0",
                       "--no-progress"]) == 0
    cfg = load_checked_config(FACECOM, _tiny(tmp_path, "data.source=shards", f"data.shards={shards}"))
    with pytest.raises(ConfigError, match=r"does not fit the facecom model this config builds: \d+ with another "
                                          r"shape \(e\.g\. [\w.]+: \[8"):
        resolve_resume(cfg, str(run / "checkpoints" / "latest.pt"))


class _RunsCode:
    """Unpickling this would create a marker file (what a crafted checkpoint does)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind, fragment", [
    ("empty", "empty file"),
    ("truncated", "truncated or corrupt"),
    ("not_biomtl", "not a biomtl training checkpoint"),
    ("exported", "an exported model file"),
    ("code", "refused"),
])
def test_a_file_that_is_no_training_checkpoint_is_one_line(tmp_path: Path, kind: str, fragment: str) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "elsewhere" / "ckpt.pt"
    path.parent.mkdir()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind in ("truncated", "exported"):
        real = _fake_checkpoint(load_config(FACECOM, _tiny(tmp_path)), tmp_path / "real.pt")
        if kind == "truncated":
            path.write_bytes(real.read_bytes()[:5000])
        else:
            state = torch.load(real, weights_only=True)
            torch.save({"model": state["model"], "config": state["client"]["config"],
                        "data_info": state["client"]["data_info"]}, path)
    elif kind == "not_biomtl":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        torch.save({"model": {}, "optimizer": _RunsCode(str(marker))}, path)
    cfg = load_checked_config(FACECOM, _tiny(tmp_path))
    with pytest.raises(ConfigError) as info:
        resolve_resume(cfg, str(path))
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_optimizer_change_is_refused(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    cfg = load_checked_config(FACECOM, _tiny(tmp_path, "train.optimizer=sgd"))
    with pytest.raises(ConfigError, match="optimizer state is adamw, but train.optimizer is sgd"):
        resolve_resume(cfg, str(run / "checkpoints" / "latest.pt"))


def test_strategy_layout_mismatch_is_one_line(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    cfg = load_checked_config(FACECOM, _tiny(tmp_path))
    with pytest.raises(ConfigError, match="a folder .a DeepSpeed checkpoint"):
        resolve_resume(cfg, str(run / "checkpoints"))
    ds = load_checked_config(FACECOM, _tiny(tmp_path, "train.strategy=deepspeed",
                                            f"deepspeed.config={REPO / 'configs/deepspeed/zero2.json'}"))
    with pytest.raises(ConfigError, match="a DeepSpeed checkpoint is a folder"):
        resolve_resume(ds, str(run / "checkpoints" / "latest.pt"))


def test_deepspeed_checkpoint_of_another_recipe_is_refused(tmp_path: Path) -> None:
    """DeepSpeed folders: the client state in the model-states file (loaded weights-only) says the recipe."""
    pytest.importorskip("deepspeed")
    from recipes.model_file import deepspeed_client_state

    dcal = load_config(DCAL, [f"data.synthetic.cache_dir={tmp_path / 'cache'}"])
    folder = tmp_path / "runs" / "dcal_x" / "checkpoints" / "latest"
    (folder / "state").mkdir(parents=True)
    (folder / "latest").write_text("state")
    client = {"config": resolved_config_dict(dcal), "data_info": {}, "loop": {"step": 1}}
    torch.save({"module": {"w": torch.zeros(2)}, **deepspeed_client_state(client), "ds_config": {"zero_optimization": {"stage": 0}}},
               folder / "state" / "mp_rank_00_model_states.pt")
    cfg = load_checked_config(FACECOM, _tiny(tmp_path, "train.strategy=deepspeed",
                                             f"deepspeed.config={REPO / 'configs/deepspeed/zero0.json'}"))
    with pytest.raises(ConfigError, match="recipe 'dcal_twins', but recipe.name is 'facecom'"):
        resolve_resume(cfg, str(folder))


def test_checkpoint_outside_a_run_starts_a_new_run_directory(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    cfg = load_checked_config(FACECOM, _tiny(tmp_path))
    loose = tmp_path / "downloads" / "ckpt.pt"
    loose.parent.mkdir()
    loose.write_bytes((run / "checkpoints" / "latest.pt").read_bytes())
    resume = resolve_resume(cfg, str(loose))
    new_run = run_dir_for(cfg, resume, is_main=True)
    assert new_run.parent == tmp_path / "runs" and new_run != run
    assert sorted(p.name for p in loose.parent.iterdir()) == ["ckpt.pt"]  # its folder is not made a run
    assert run_dir_for(cfg, run / "checkpoints" / "latest.pt", is_main=True) == run.resolve()


def test_replayed_schedule_follows_the_new_settings() -> None:
    """After loading a checkpoint's optimizer and scheduler state, the replay gives
    the LR a fresh run with the new lr / max_steps has at the resumed step (the
    loaded state alone keeps the old base LR and schedule length)."""
    from dist_train.config import SchedulerConfig
    from dist_train.schedulers import build_scheduler
    from dist_train.trainer import _replay_schedule, _schedule_snapshot

    def make(lr: float, total: int):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)
        return SimpleNamespace(optimizer=opt, scheduler=build_scheduler(SchedulerConfig(warmup_steps=1), opt, total))

    old = make(1e-3, 4)
    for _ in range(2):
        old.optimizer.step()
        old.scheduler.step()
    new = make(2e-3, 10)
    fresh = _schedule_snapshot(new)
    new.optimizer.load_state_dict(old.optimizer.state_dict())
    new.scheduler.load_state_dict(old.scheduler.state_dict())
    assert new.scheduler.get_last_lr()[0] == old.scheduler.get_last_lr()[0]  # the old schedule (same arithmetic)
    assert _replay_schedule(new, fresh)
    reference = make(2e-3, 10)
    for _ in range(2):
        reference.optimizer.step()
        reference.scheduler.step()
    assert new.optimizer.param_groups[0]["lr"] == reference.optimizer.param_groups[0]["lr"]
    assert new.scheduler.last_epoch == 2
    new.scheduler.step()
    reference.scheduler.step()
    assert new.scheduler.get_last_lr()[0] == reference.scheduler.get_last_lr()[0]


@pytest.mark.integration  # two short training runs
def test_resume_with_a_changed_schedule_warns_and_applies_it(tmp_path: Path, caplog) -> None:
    from dist_train.config import SchedulerConfig
    from dist_train.main import train
    from dist_train.schedulers import build_scheduler

    common = dict(train__scheduler__warmup_steps=1, train__val_every_steps=100)
    train(load_config(FACECOM, tiny_overrides(tmp_path, train__max_steps=4, train__stop_at_step=2, **common)), None)
    run = next((tmp_path / "runs").iterdir())
    cfg = load_config(FACECOM, tiny_overrides(tmp_path, train__max_steps=6, train__lr=0.004, **common))
    biomtl_log = logging.getLogger("biomtl")  # its console handler does not propagate to caplog's
    biomtl_log.addHandler(caplog.handler)
    try:
        train(cfg, resolve_resume(cfg, str(run / "checkpoints" / "latest.pt")))
    finally:
        biomtl_log.removeHandler(caplog.handler)
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "train.max_steps 4 -> 6" in warned and "train.lr 0.002 -> 0.004" in warned, warned
    with (run / "logs" / "train_logs.csv").open() as fh:
        rows = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(fh)}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.004)
    reference = build_scheduler(SchedulerConfig(warmup_steps=1), opt, 6)
    expected = {}
    for step in range(1, 7):
        expected[step] = opt.param_groups[0]["lr"]
        opt.step()
        reference.step()
    for step in (3, 4, 5, 6):  # the steps after the resume follow the new lr and length
        # the run's scheduler does this arithmetic at this step; its CSV keeps 6 significant digits
        assert rows[step] == float(f"{expected[step]:.6g}"), (step, rows, expected)


def test_resume_that_does_not_fit_data_made_only_now_is_one_line_and_rewrites_nothing(tmp_path: Path) -> None:
    """Synthetic data of another spec (6 identities vs the checkpoint's 8) exists
    only once the run generates it, after the preflight: the check then runs
    again before the run's files change (config.yaml stays the source run's)."""
    run = _fake_run(tmp_path)
    before = _tree(tmp_path / "runs")
    proc = subprocess.run([PYTHON, "dist_train/main.py", "--config", str(FACECOM), "--resume",
                           str(run / "checkpoints" / "latest.pt"),
                           *_tiny(tmp_path, data__synthetic__num_identities=6,
                                  data__synthetic__cache_dir=tmp_path / "new-cache")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    assert "does not fit the facecom model" in line, line
    assert _tree(tmp_path / "runs") == before


def test_resume_latest_takes_only_runs_of_exactly_this_experiment(tmp_path: Path) -> None:
    import os

    cfg = load_checked_config(FACECOM, _tiny(tmp_path, experiment__name="exp"))
    other = _fake_checkpoint(cfg, tmp_path / "runs" / "exp_b_20250102-000000" / "checkpoints" / "latest.pt")
    with pytest.raises(ConfigError, match="no checkpoint"):
        resolve_resume(cfg, "latest")
    own = _fake_checkpoint(cfg, tmp_path / "runs" / "exp_20250101-000000" / "checkpoints" / "latest.pt")
    os.utime(own, (1, 1))  # older than exp_b's: newest is not enough to be chosen
    assert resolve_resume(cfg, "latest") == own
    assert other.exists()


def test_run_directory_names_have_one_owner(tmp_path: Path) -> None:
    from dist_train.checkpoint import experiment_runs, new_run_dir

    first = new_run_dir(tmp_path, "exp")
    second = new_run_dir(tmp_path, "exp")  # same second: a suffix, never the same folder
    new_run_dir(tmp_path, "exp_b")
    (tmp_path / "exp_notes").mkdir()
    (tmp_path / "exp_20250101-000000.txt").write_text("not a run")
    assert first != second and first.name.startswith("exp_")
    assert sorted(experiment_runs(tmp_path, "exp")) == sorted([first, second])
    assert [p.name.startswith("exp_b_") for p in experiment_runs(tmp_path, "exp_b")] == [True]
    assert experiment_runs(tmp_path / "missing", "exp") == []


def test_a_checkpoint_whose_optimizer_state_does_not_load_is_one_line_and_rewrites_nothing(tmp_path: Path) -> None:
    """Names and shapes fit, but the optimizer state does not (here: none at all):
    found when the trainer loads it, still before the run's files change."""
    run = _fake_run(tmp_path)
    before = _tree(tmp_path / "runs")
    proc = subprocess.run([PYTHON, "dist_train/main.py", "--config", str(FACECOM), "--resume",
                           str(run / "checkpoints" / "latest.pt"), *_tiny(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # found once the run has started (its INFO lines went to the console): one error line, no traceback
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "does not load into" in errors[0] and "KeyError" in errors[0], errors[0]
    assert _tree(tmp_path / "runs") == before
    loose = tmp_path / "downloads" / "ckpt.pt"  # resumed in a new run directory: none is left
    loose.parent.mkdir()
    loose.write_bytes((run / "checkpoints" / "latest.pt").read_bytes())
    proc = subprocess.run([PYTHON, "dist_train/main.py", "--config", str(FACECOM), "--resume", str(loose),
                           *_tiny(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "does not load into" in proc.stderr, proc.stderr[-3000:]
    assert _tree(tmp_path / "runs") == before
