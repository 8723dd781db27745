"""``checkpoint.monitor`` (and early stopping's metrics) must name a validation
metric the recipe declares: a misspelling is one line, exit 2, before any run
directory exists, instead of a run that silently never writes best.pt."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dist_train.config import ConfigError, load_config, recipe_params
from dist_train.preflight import check_monitored_metrics, load_checked_config
from recipes.base import get_recipe, recipe_names
from tests.conftest import PYTHON, REPO, tiny_overrides

FACECOM = REPO / "configs" / "facecom.yaml"


def test_a_misspelt_monitor_is_one_line_exit_2_and_no_run_dir(tmp_path: Path) -> None:
    proc = subprocess.run([PYTHON, "dist_train/main.py", "--config", str(FACECOM),
                           *tiny_overrides(tmp_path, checkpoint__monitor="combind")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint.monitor"), proc.stderr[-3000:]
    assert "'combind'" in lines[0] and "combined" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_early_stopping_metrics_are_checked_the_same_way(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.early_stopping.metrics: 'gender_accuracy' is not"):
        load_checked_config(FACECOM, tiny_overrides(tmp_path, train__early_stopping__metrics="[loss,gender_accuracy]",
                                                    train__early_stopping__modes="[min,max]"))


def test_without_validation_the_monitor_is_not_checked(tmp_path: Path) -> None:
    """No validation split: no best or top-k at all, so nothing to monitor."""
    cfg = load_config(FACECOM, tiny_overrides(tmp_path, data__val_split="none", checkpoint__monitor="anything"))
    check_monitored_metrics(cfg)


def test_every_recipe_declares_its_metrics_and_every_shipped_config_monitors_one() -> None:
    for name in recipe_names():
        cls = get_recipe(name)
        names = cls.validation_metric_names(cls.Params())
        assert names and all(isinstance(n, str) for n in names), name
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(configs) >= 7
    for path in configs:
        cfg = load_config(path, ["data.source=synthetic"])  # the metrics do not depend on where data come from
        check_monitored_metrics(cfg)  # raises on a name the recipe does not produce
        declared = get_recipe(cfg.recipe.name).validation_metric_names(recipe_params(cfg))
        assert cfg.checkpoint.monitor == "loss" or cfg.checkpoint.monitor in declared, path


def test_the_declared_names_are_those_the_metrics_compute() -> None:
    """The declaration and ``compute`` do not drift apart (the verification block
    is shared by the dcal, THz, photometric and ear recipes)."""
    import numpy as np

    from recipes.dcal_twins import VerificationMetrics
    from recipes.ear_teacher import EarMetrics
    from recipes.facecom import FaceComMetrics

    ident = np.repeat(np.arange(6), 4)
    state = {"embedding": np.random.default_rng(0).normal(size=(24, 8)).astype(np.float16), "identity": ident,
             "twin": np.where(ident % 2 == 0, ident + 1, ident - 1), "max_pairs": 1000, "seed": 0}
    verification = set(VerificationMetrics.compute([state]))
    assert {"eer", "twin_eer", "threshold"} <= verification <= VerificationMetrics.NAMES
    assert set(EarMetrics.compute([{"verification": state, "mse": np.ones(3)}])) <= EarMetrics.NAMES
    assert set(FaceComMetrics.compute([])) == FaceComMetrics.NAMES
