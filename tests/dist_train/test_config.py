"""Config: overrides, one-line errors naming the key, exit code 2, nothing written."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dist_train.config import ConfigError, load_config
from tests.conftest import PYTHON, REPO


def test_overrides_apply_with_types(facecom_config: Path) -> None:
    cfg = load_config(facecom_config, ["train.lr=3e-4", "data.batch_size=64", "train.precision=fp32",
                                       "train.early_stopping.metrics=[combined]",
                                       "train.early_stopping.modes=[max]"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.batch_size == 64
    assert cfg.train.precision == "fp32"
    assert cfg.train.early_stopping.metrics == ["combined"]


@pytest.mark.parametrize("override, fragment", [
    ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'lr'?)"),
    ("trian.lr=1", "unknown config key 'trian' (did you mean 'train'?)"),
    ("data.batch_size=big", "data.batch_size: expected an integer, got 'big'"),
    ("train.precision=fp8", "train.precision: 'fp8' is not one of"),
    ("data.shards=/nonexistent/x", "data.shards: path does not exist: /nonexistent/x"),
    ("recipe.params.backbon=resnet18", "unknown config key 'recipe.params.backbon' (did you mean 'backbone'?)"),
    ("recipe.name=facecon", "recipe.name: unknown recipe 'facecon' (did you mean 'facecom'?)"),
])
def test_bad_values_raise_one_line_error_naming_the_key(facecom_config: Path, override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(facecom_config, [override])
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize("entry", [[PYTHON, "dist_train/main.py"], [PYTHON, "-m", "dist_train.cli", "train"]])
def test_cli_exits_2_and_writes_nothing(tmp_path: Path, entry: list[str]) -> None:
    out = tmp_path / "runs"
    proc = subprocess.run(entry + ["--config", "configs/facecom.yaml", f"experiment.output_dir={out}",
                                   f"data.synthetic.cache_dir={tmp_path / 'cache'}", "train.lrr=0.1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == ["error: unknown config key 'train.lrr' (did you mean 'lr'?)"]
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_resume_latest_without_checkpoint_is_a_config_error(tmp_path: Path) -> None:
    proc = subprocess.run([PYTHON, "dist_train/main.py", "--config", "configs/facecom.yaml", "--resume", "latest",
                           f"experiment.output_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "--resume latest: no checkpoint under" in proc.stderr


def test_missing_config_file_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--config: file not found"):
        load_config("configs/nope.yaml")


def test_ci_runs_the_readme_commands() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash\n")[1:]]
    setup, main_job, test_command = blocks[:3]
    assert "dist_train/main.py --config configs/facecom.yaml" in main_job
    assert setup in ci.splitlines()
    assert ci.strip().splitlines()[-1] == test_command
