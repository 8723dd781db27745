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


def test_base_config_is_merged_deep_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "presets").mkdir()
    (tmp_path / "root.yaml").write_text("recipe: {name: dcal_twins, params: {depth: 4, top_r: 0.3}}\n"
                                        "train: {lr: 0.01, epochs: 3}\n")
    (tmp_path / "presets" / "mid.yaml").write_text("base: ../root.yaml\nrecipe: {params: {depth: 2}}\n")
    (tmp_path / "presets" / "leaf.yaml").write_text("base: mid.yaml\ntrain: {epochs: 1}\n")
    cfg = load_config(tmp_path / "presets" / "leaf.yaml", ["train.lr=0.5"])
    assert cfg.recipe.name == "dcal_twins"
    assert cfg.recipe.params == {"depth": 2, "top_r": 0.3}      # merged key by key, the leaf's wins
    assert (cfg.train.epochs, cfg.train.lr) == (1, 0.5)          # command-line overrides come last


def test_base_config_cycle_and_missing_base_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="form a cycle") as err:
        load_config(tmp_path / "a.yaml")
    assert "\n" not in str(err.value)
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match="'base' must be the path"):
        load_config(tmp_path / "d.yaml")


@pytest.mark.parametrize("preset", ["single_gpu", "multi_node", "cpu_debug", "no_tracking"])
def test_dcal_presets_build_on_the_default(preset: str) -> None:
    default = load_config(REPO / "configs" / "dcal_twins.yaml")
    cfg = load_config(REPO / "configs" / "dcal_twins" / f"{preset}.yaml")
    assert cfg.recipe.name == "dcal_twins"
    assert cfg.recipe.params["backbone"] == default.recipe.params["backbone"]   # inherited
    expected = {"single_gpu": lambda c: c.recipe.params["depth"] == 0 and c.data.num_workers == 4,
                "multi_node": lambda c: c.dist.backend == "nccl" and c.data.batching == "pk"
                and c.data.batch_size == 64,                                    # two levels of base
                "cpu_debug": lambda c: c.train.max_steps == 4 and c.train.precision == "fp32",
                "no_tracking": lambda c: c.logging.tracking == "none" and c.train.epochs == default.train.epochs}
    assert expected[preset](cfg)


# ---------------------------------------------------------------------------
# Hostile config files (issue 22, points 8 and 11)

BILLION_LAUGHS = "recipe:\n  params:\n    laughs:\n    - &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"    - &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, n in zip("abcdefgh", "bcdefghi"))


def test_alias_expansion_is_bounded(tmp_path: Path) -> None:
    """A 1 KB file whose aliases expand to 10**9 values is refused while loading (before dump_config)."""
    (tmp_path / "laughs.yaml").write_text(BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 1024
    with pytest.raises(ConfigError, match=r"laughs.yaml: YAML aliases expand to more than \d+ values") as err:
        load_config(tmp_path / "laughs.yaml")
    assert "\n" not in str(err.value)


def test_a_few_aliases_still_load(tmp_path: Path) -> None:
    (tmp_path / "anchors.yaml").write_text("train: {lr: &lr 0.01, betas: [0.9, 0.99]}\n"
                                           "recipe: {name: facecom, params: {dropout: &p 0.1}}\n")
    assert load_config(tmp_path / "anchors.yaml").train.lr == 0.01


@pytest.mark.parametrize("where", ["file", "override"])
def test_deep_nesting_is_bounded(tmp_path: Path, where: str) -> None:
    deep = "[" * 5000 + "]" * 5000
    if where == "file":
        (tmp_path / "deep.yaml").write_text(f"recipe: {{params: {{x: {deep}}}}}\n")
        args = (tmp_path / "deep.yaml", [])
    else:
        args = (None, [f"recipe.params.x={deep}"])
    with pytest.raises(ConfigError, match=r"YAML nested deeper than \d+ levels") as err:
        load_config(*args)
    assert "\n" not in str(err.value)


def test_cli_with_billion_laughs_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "laughs.yaml").write_text(BILLION_LAUGHS)
    proc = subprocess.run([PYTHON, "dist_train/main.py", "--config", str(tmp_path / "laughs.yaml"),
                           f"experiment.output_dir={tmp_path / 'runs'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "YAML aliases expand" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


SECRET = "root:$6$saltsalt$notarealhashbutsecret:20228:0:99999:7:::\n"


@pytest.mark.parametrize("base", ["/ABS/secret", "../secret", "secret.yaml"])
def test_base_never_echoes_a_file_that_is_not_a_config(tmp_path: Path, base: str) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "secret").write_text(SECRET)
    (tmp_path / "sub" / "secret.yaml").write_text(SECRET)
    (tmp_path / "sub" / "c.yaml").write_text(f"base: {base.replace('/ABS', str(tmp_path))}\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "sub" / "c.yaml")
    message = str(err.value)
    assert "saltsalt" not in message and "20228" not in message and "\n" not in message


@pytest.mark.parametrize("base, fragment", [
    ("/ABS/root.yaml", "must be a path relative to"),
    ("~/root.yaml", "must be a path relative to"),
    ("../secret", "must name a .yaml or .yml file"),
])
def test_base_is_a_relative_yaml_file_as_documented(tmp_path: Path, base: str, fragment: str) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("train: {epochs: 3}\n")
    (tmp_path / "secret").write_text(SECRET)
    (tmp_path / "sub" / "c.yaml").write_text(f"base: {base.replace('/ABS', str(tmp_path))}\n")
    with pytest.raises(ConfigError, match=fragment):
        load_config(tmp_path / "sub" / "c.yaml")


def test_a_config_that_is_not_a_mapping_of_sections_names_no_content(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("password: hunter2\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not a biomtl config") as err:
        load_config(tmp_path / "c.yaml")
    assert "hunter2" not in str(err.value) and "password" not in str(err.value)
    (tmp_path / "t.yaml").write_text("trian: {lr: 1}\n")  # a typo of a section is still named
    with pytest.raises(ConfigError, match=r"unknown config key 'trian' \(did you mean 'train'\?\)"):
        load_config(tmp_path / "t.yaml")


def test_a_binary_config_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(ConfigError, match="bin.yaml: not a UTF-8 text file"):
        load_config(tmp_path / "bin.yaml")


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", ".", "", "x\\y"])
def test_experiment_name_is_one_safe_path_component(name: str) -> None:
    with pytest.raises(ConfigError, match="experiment.name: must be a single folder name"):
        load_config(REPO / "configs" / "facecom.yaml", [f"experiment.name={name!s}" if name else "experiment.name=''"])


def test_experiment_name_with_a_space_is_fine() -> None:
    assert load_config(REPO / "configs" / "facecom.yaml", ["experiment.name=a b"]).experiment.name == "a b"


@pytest.mark.parametrize("override, fragment", [
    ("dist.timeout_s=1000000000000000", "dist.timeout_s: must be in [1, 604800]"),
    ("experiment.seed=100000000000000000000000", "experiment.seed: must be in [0, 4294967295]"),
    ("experiment.seed=-1", "experiment.seed: must be in [0, 4294967295]"),
    ("train.scheduler.power=-1", "train.scheduler.power: must be > 0"),
    ("train.lr=1e30", "train.lr: must be > 0 and at most 10, got 1e+30"),
])
def test_values_out_of_a_usable_range_are_one_line(facecom_config: Path, override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(facecom_config, [override])
    assert fragment in str(err.value) and "\n" not in str(err.value)
