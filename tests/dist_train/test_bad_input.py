"""Bad input is one ``error:`` line: exit 2 before anything is written (config
values, missing splits, an output folder that cannot be written), exit 1 for an
I/O failure during the run (disk full), under torchrun too; and nothing is left
behind: temp and staging files of a failed or killed save are removed or swept."""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch

from dist_train.checkpoint import CheckpointManager, CheckpointPolicy, _move_into_place, atomic_save, atomic_write
from dist_train.config import Config, ConfigError, load_config
from dist_train.preflight import load_checked_config
from shards.manifest import Manifest
from tests.conftest import PYTHON, REPO, tiny_overrides

FACECOM = REPO / "configs" / "facecom.yaml"


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


def _main(tmp_path: Path, *overrides: str, config: Path = FACECOM) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "dist_train/main.py", "--config", str(config), *tiny_overrides(tmp_path),
                           *overrides], cwd=REPO, capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------
# Config values


@pytest.mark.parametrize("override, fragment", [
    ("train.lr=nan", "train.lr: must be a finite number"),
    ("train.lr=.inf", "train.lr: must be a finite number"),
    ("train.lr=inf", "train.lr: must be a finite number"),
    ("train.lr=-1", "train.lr: must be > 0"),
    ("train.weight_decay=nan", "train.weight_decay: must be a finite number"),
    ("train.weight_decay=-0.1", "train.weight_decay: must be >= 0"),
    ("train.val_every_epochs=nan", "train.val_every_epochs: must be a finite number"),
    ("data.max_corrupt_fraction=1", "data.max_corrupt_fraction: must be in [0, 1)"),
    ("data.max_corrupt_fraction=1.5", "data.max_corrupt_fraction: must be in [0, 1)"),
    ("data.max_corrupt_fraction=-0.01", "data.max_corrupt_fraction: must be in [0, 1)"),
    ("data.max_corrupt_fraction=nan", "data.max_corrupt_fraction: must be a finite number"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer: must be >= 0"),
    ("train.grad_clip=-1", "train.grad_clip: must be >= 0"),
    ("train.grad_clip=inf", "train.grad_clip: must be a finite number"),
    ("train.betas=[0.9,nan]", "train.betas[1]: must be a finite number"),
    ("train.scheduler.min_lr_ratio=2", "train.scheduler.min_lr_ratio: must be in [0, 1]"),
    ("recipe.params.alpha=nan", "recipe.params.alpha: must be a finite number"),
    ("recipe.params.margin_m=inf", "recipe.params.margin_m: must be a finite number"),
])
def test_non_finite_and_out_of_range_values_name_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(FACECOM, [override])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_finite_values_in_range_still_load() -> None:
    cfg = load_config(FACECOM, ["data.max_corrupt_fraction=0", "data.shuffle_buffer=0", "train.grad_clip=0",
                                "recipe.params.margin_m=null", "train.lr=3e-4"])
    assert cfg.data.max_corrupt_fraction == 0.0 and cfg.train.lr == pytest.approx(3e-4)


def test_nan_learning_rate_on_the_command_line_exits_2_writing_nothing(tmp_path: Path) -> None:
    proc = _main(tmp_path, "train.lr=nan")
    assert proc.returncode == 2
    assert _one_error_line(proc.stderr) == "error: train.lr: must be a finite number, got 'nan'"
    assert not (tmp_path / "runs").exists()


def test_the_collective_timeout_default_fails_a_stopped_rank_within_minutes() -> None:
    assert 60 <= Config().dist.timeout_s <= 600
    readme = (REPO / "README.md").read_text()
    assert f"`dist.timeout_s` (default {Config().dist.timeout_s} s)" in readme and "dist.timeout_s=1800" in readme


# ---------------------------------------------------------------------------
# Splits


@pytest.fixture(scope="module")
def no_val_shards(tmp_path_factory) -> Path:
    """Shards packed with train and test only (no validation split)."""
    from shards.cli import run as shards_run

    out = tmp_path_factory.mktemp("shards") / "train_test"
    assert shards_run(["create", "--format", "synthetic", "--output", str(out), "--splits", "train=0.75,test=0.25",
                       "--identities", "8", "--samples", "10", "--size", "32", "--split-by", "sample",
                       "--workers", "0", "--no-progress"]) == 0
    return out


def test_missing_validation_split_is_found_before_training(tmp_path: Path, no_val_shards: Path) -> None:
    proc = _main(tmp_path, "data.source=shards", f"data.shards={no_val_shards}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    sizes = Manifest.load(no_val_shards).data_info().split_sizes
    assert "validation split 'val' does not exist" in line
    assert f"train ({sizes['train']})" in line and f"test ({sizes['test']})" in line  # the splits the data has
    assert "data.val_split=test" in line and "data.val_split=none" in line  # the overrides that fix it
    assert not (tmp_path / "runs").exists()


def test_missing_train_split_is_found_before_training(no_val_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.train_split: split 'training' does not exist in .* "
                                          r"\(splits: .*train \(\d+\).*\); set data.train_split=train$"):
        load_checked_config(FACECOM, tiny_overrides(tmp_path) + ["data.source=shards", f"data.shards={no_val_shards}",
                                                                 "data.train_split=training", "data.val_split=none"])


def test_early_stopping_without_validation_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="train.early_stopping.metrics: early stopping needs validation"):
        load_config(FACECOM, ["data.val_split=none", "train.early_stopping.metrics=[loss]",
                              "train.early_stopping.modes=[min]"])


@pytest.mark.integration  # a short training run
def test_training_without_validation_runs_to_the_end(tmp_path: Path, no_val_shards: Path) -> None:
    from dist_train.main import train

    cfg = load_checked_config(FACECOM, tiny_overrides(tmp_path, train__max_steps=3) + [
        "data.source=shards", f"data.shards={no_val_shards}", "data.val_split=none", "checkpoint.every_steps=2"])
    train(cfg, None)
    run = next((tmp_path / "runs").iterdir())
    assert torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["client"]["loop"]["step"] == 3
    assert (run / "checkpoints" / "periodic" / "step_00000002.pt").exists()
    assert not (run / "checkpoints" / "best.pt").exists() and not list((run / "checkpoints" / "topk").iterdir())
    assert (run / "model.pt").exists() and (run / "final_metrics.json").exists()
    val_log = run / "logs" / "validation_logs.csv"
    assert not val_log.exists() or val_log.read_text().strip() == ""  # no validation ran


# ---------------------------------------------------------------------------
# Where the run writes


def test_a_file_in_the_way_of_output_dir_exits_2_writing_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    proc = _main(tmp_path, f"experiment.output_dir={blocker / 'runs'}")
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert line.startswith(f"error: experiment.output_dir: {blocker} is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_a_read_only_output_dir_exits_2(tmp_path: Path, monkeypatch) -> None:
    """chmod 0555 (as root, which may write anyway, os.access is made to say
    what it says for other users or on a read-only mount)."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != read_only and real_access(p, mode, **kw))
    with pytest.raises(ConfigError, match=rf"experiment.output_dir: {read_only} is not writable: permission denied "
                                          rf"or a read-only file system \(cannot create {read_only / 'runs'} in it\)"):
        load_checked_config(FACECOM, tiny_overrides(tmp_path, experiment__output_dir=read_only / "runs"))
    assert list(read_only.iterdir()) == []


def test_shards_create_output_under_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("")
    proc = subprocess.run([PYTHON, "-m", "shards.cli", "create", "--format", "synthetic", "--output",
                           str(tmp_path / "blocker" / "sub" / "out"), "--identities", "4", "--samples", "4",
                           "--size", "16", "--workers", "0", "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"biomtl shards create: error: --output: cannot create {tmp_path / 'blocker' / 'sub' / 'out'}: "
                     f"{tmp_path / 'blocker'} is a file, not a directory"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_shards_create_into_a_read_only_folder_is_an_input_error(tmp_path: Path, monkeypatch) -> None:
    from shards.build import create
    from shards.sources import InputError

    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != read_only and real_access(p, mode, **kw))
    with pytest.raises(InputError, match=f"cannot create {read_only / 'out'}: {read_only} is not writable"):
        create("synthetic", None, read_only / "out", workers=0)
    assert list(read_only.iterdir()) == []


# ---------------------------------------------------------------------------
# Disk full while saving


def _full_disk(monkeypatch, only: str = "checkpoints") -> None:
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if only in str(getattr(f, "name", "") if hasattr(f, "write") else f):  # an open file or a path
            if hasattr(f, "write"):
                f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_disk_full_while_saving_a_checkpoint_names_it_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    _full_disk(monkeypatch)
    manager = CheckpointManager(tmp_path / "checkpoints", CheckpointPolicy("loss", "min", 1, 0), is_main=True)
    with pytest.raises(OSError) as info:
        manager.save(lambda path: atomic_save({"w": torch.zeros(3)}, path), step=1, metrics=None)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(tmp_path / "checkpoints" / "latest.pt")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["topk"]


def test_a_torch_write_failure_without_errno_is_reported_as_disk_full(tmp_path: Path, monkeypatch) -> None:
    """DeepSpeed's engine calls torch.save(obj, path_string), which says only
    'basic_ios::clear: iostream error' when the disk is full."""
    import shutil

    from dist_train.checkpoint import as_write_error

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 0))
    manager = CheckpointManager(tmp_path / "checkpoints", CheckpointPolicy("loss", "min", 1, 0), is_main=True,
                                suffix="")

    def write(path: Path) -> None:
        path.mkdir()
        (path / "mp_rank_00_model_states.pt").write_bytes(b"partial")
        raise RuntimeError("basic_ios::clear: iostream error")

    with pytest.raises(OSError) as info:
        manager.save(write, step=1, metrics=None)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "checkpoints" / "latest")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["topk"]
    other = RuntimeError("a bug, not a write failure")
    assert as_write_error(other, tmp_path) is other


@pytest.mark.integration  # a short training run
def test_disk_full_mid_run_is_one_line_exit_1(tmp_path: Path, monkeypatch, capsys) -> None:
    from dist_train.main import run

    _full_disk(monkeypatch)
    code = run(["--config", str(FACECOM), *tiny_overrides(tmp_path, train__max_steps=1)])
    assert code == 1
    stderr = capsys.readouterr().err  # (in-process, the console log shares stderr)
    ckpt_dir = next((tmp_path / "runs").iterdir()) / "checkpoints"
    assert [line for line in stderr.splitlines() if line.startswith("error")] == [
        f"error: I/O failure: {ckpt_dir / 'latest.pt'}: No space left on device"]
    assert "Traceback" not in stderr
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["topk"]


_FULL_DISK_MAIN = '''\
import errno, os, sys
sys.path.insert(0, {repo!r})
import torch
_real_save = torch.save
def _save(obj, f, *args, **kwargs):  # rank 0's disk is full under checkpoints/
    if os.environ.get("RANK") == "0" and "checkpoints" in str(getattr(f, "name", "") if hasattr(f, "write") else f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _real_save(obj, f, *args, **kwargs)
torch.save = _save
from torch.distributed.elastic.multiprocessing.errors import record
from dist_train.main import run
sys.exit(record(run)())
'''


def _torchrun(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                           *args], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.integration  # torchrun, 2 ranks
def test_disk_full_under_torchrun_is_one_line_per_rank_not_tracebacks(tmp_path: Path) -> None:
    script = tmp_path / "full_disk_main.py"
    script.write_text(_FULL_DISK_MAIN.format(repo=str(REPO)))
    proc = _torchrun(script, "--config", str(FACECOM), *tiny_overrides(tmp_path, train__max_steps=2))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    full = [e for e in errors if e.startswith("error: rank 0: I/O failure: ")]
    assert len(full) == 1 and full[0].endswith("/checkpoints/latest.pt: No space left on device"), \
        proc.stderr[-4000:]
    # rank 1, blocked in the checkpoint barrier, says it stopped (unless torchrun ended it first)
    assert all(e.startswith("error: rank 1: stopped: another rank failed") for e in errors if e not in full), errors
    assert not [line for line in proc.stderr.splitlines() if line.startswith("[rank")], proc.stderr[-4000:]
    assert f'File "{REPO / "dist_train"}' not in proc.stderr  # no traceback of ours (torchrun prints its summary)


@pytest.mark.integration  # torchrun, 2 ranks
def test_config_error_under_torchrun_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    proc = _torchrun(REPO / "dist_train" / "main.py", "--config", str(FACECOM),
                     *tiny_overrides(tmp_path, experiment__output_dir=blocker / "runs"))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: experiment.output_dir: {blocker} is a file, not a folder (cannot create "
                      f"{blocker / 'runs'})"], proc.stderr[-4000:]
    assert not [line for line in proc.stderr.splitlines() if line.startswith("[rank")]


# ---------------------------------------------------------------------------
# Temp and staging files


def test_a_failed_write_leaves_no_temp_file(tmp_path: Path) -> None:
    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError) as info:
        atomic_write(tmp_path / "model.pt", fail)
    assert info.value.filename == str(tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


def test_temp_files_of_killed_writers_are_swept_at_the_next_save(tmp_path: Path) -> None:
    stale = [tmp_path / ".latest.pt.tmp4242", tmp_path / ".latest.pt.tmp1"]
    for path in stale:
        path.write_bytes(b"left by SIGKILL")
    (tmp_path / ".latest.pt.old77").mkdir()  # a folder swap cut short
    other = tmp_path / ".best.pt.tmp4242"  # another target's: not ours to judge
    other.write_bytes(b"")
    atomic_save({"w": torch.ones(1)}, tmp_path / "latest.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best.pt.tmp4242", "latest.pt"]


def test_staging_left_by_a_killed_save_does_not_survive_a_resume(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    (ckpt / "topk").mkdir(parents=True)
    (ckpt / "latest.pt").write_bytes(b"the last good checkpoint")
    for name in (".staging.pt", "..staging.pt.tmp31337", "topk/.step_00000004.pt.tmp31337", ".best.pt.tmp9"):
        (ckpt / name).write_bytes(b"left by SIGKILL")
    (ckpt / ".staging").mkdir()  # a DeepSpeed staging folder
    CheckpointManager(ckpt, CheckpointPolicy("loss", "min", 1, 0), is_main=True).prepare()  # a resumed run's start
    assert sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*")) == ["latest.pt", "topk"]
    assert (ckpt / "latest.pt").read_bytes() == b"the last good checkpoint"


def test_a_failed_folder_swap_keeps_the_previous_version(tmp_path: Path, monkeypatch) -> None:
    old, new = tmp_path / "latest", tmp_path / ".staging"
    old.mkdir()
    (old / "f").write_text("previous")
    new.mkdir()
    real_replace = os.replace

    def replace(src, dst):
        if Path(src) == new:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        _move_into_place(new, old)
    assert (old / "f").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".staging", "latest"]


# ---------------------------------------------------------------------------
# Silent acceptance (issue 22, point 11)


def test_an_unknown_test_split_names_the_splits(tmp_path: Path, no_val_shards: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.test_split: split 'nosuch' does not exist in .* "
                                          r"\(splits: .*train \(\d+\).*\)") as err:
        load_checked_config(FACECOM, tiny_overrides(tmp_path) + ["data.source=shards", f"data.shards={no_val_shards}",
                                                                 "data.val_split=none", "data.test_split=nosuch"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"data.test_split: split 'nosuch' does not exist in the synthetic data"):
        load_checked_config(FACECOM, tiny_overrides(tmp_path) + ["data.test_split=nosuch"])
    # the default name may be missing (data without a test split), and none says: no test split
    load_checked_config(FACECOM, tiny_overrides(tmp_path) + ["data.test_split=none"])


def test_an_escaping_experiment_name_exits_2_writing_nothing(tmp_path: Path) -> None:
    proc = _main(tmp_path, "experiment.name=../../escape")
    assert proc.returncode == 2
    assert _one_error_line(proc.stderr).startswith("error: experiment.name: must be a single folder name")
    assert not (tmp_path / "runs").exists() and not list(tmp_path.parent.glob("escape_*"))


# ---------------------------------------------------------------------------
# Weights files named by recipe.params (issue 22, point 10)


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickled",))


@pytest.fixture(params=["text", "pickled code", "no tensors"])
def bad_weights(request, tmp_path: Path) -> Path:
    path = tmp_path / "weights.pth"
    if request.param == "text":
        path.write_text("these are not weights\n")
    elif request.param == "pickled code":
        torch.save({"w": _RunsCode()}, path)
    else:
        torch.save({"note": "no tensors here"}, path)
    return path


def test_a_bad_weights_path_is_found_before_the_run(tmp_path: Path, bad_weights: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^recipe.params.weights_path: .*{bad_weights}") as err:
        load_checked_config(FACECOM, tiny_overrides(tmp_path) + [f"recipe.params.weights_path={bad_weights}"])
    assert "\n" not in str(err.value)


def test_a_text_weights_path_exits_2_writing_nothing(tmp_path: Path) -> None:
    text = tmp_path / "weights.pth"
    text.write_text("these are not weights\n")
    proc = _main(tmp_path, f"recipe.params.weights_path={text}")
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert line.startswith(f"error: recipe.params.weights_path: cannot read weights file {text}")
    assert not (tmp_path / "runs").exists()


def test_bad_lpips_weights_are_found_before_the_run(tmp_path: Path, bad_weights: Path) -> None:
    overrides = [f"experiment.output_dir={tmp_path / 'runs'}", f"data.synthetic.cache_dir={tmp_path / 'cache'}",
                 "recipe.params.lpips_weight=0.1", f"recipe.params.lpips_weights={bad_weights}"]
    with pytest.raises(ConfigError, match=rf"^recipe.params.lpips_weights: .*{bad_weights}") as err:
        load_checked_config(REPO / "configs" / "thz_mtl.yaml", overrides)
    assert "\n" not in str(err.value) and "Errno" not in str(err.value)


def test_weights_that_do_not_fit_errno_less_os_errors_and_divergence_are_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """Found once the model is built (tensors of the wrong shapes): exit 2, the
    loader's own line; a library's FileNotFoundError('message') has no errno and
    its message is the line, not '[Errno None] None: RUN'; a loss gone NaN
    (what train.lr=1e30 did) is exit 1 with the step and the hint."""
    import dist_train.main as main_module
    from models.backbones import WeightsError
    from models.losses import LpipsWeightsMissing

    for exc, code, line in [
        (WeightsError("w.pth: shape mismatch for 1 tensors: conv1.weight"), 2,
         "error: w.pth: shape mismatch for 1 tensors: conv1.weight"),
        (LpipsWeightsMissing("LPIPS weights x.pth: no features.0.weight of shape (64, 3, 11, 11)"), 2,
         "error: LPIPS weights x.pth: no features.0.weight of shape (64, 3, 11, 11)"),
        (FileNotFoundError("a library's own message"), 1, "error: I/O failure: a library's own message"),
        (FloatingPointError("step 4: gender is nan"), 1,
         "error: training stopped: step 4: gender is nan (the loss diverged: lower train.lr or set train.grad_clip)"),
    ]:
        def fail(*args, _exc=exc, **kwargs):
            raise _exc

        monkeypatch.setattr(main_module, "_train_in", fail)
        capsys.readouterr()
        assert main_module.run(["--config", str(FACECOM), *tiny_overrides(tmp_path)]) == code
        assert [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")] == [line]


def test_disk_full_is_named_even_when_the_removed_partial_file_frees_the_space(tmp_path: Path, monkeypatch) -> None:
    """A checkpoint larger than the free space fills the disk, then its partial file is
    removed: the space is back, but the failure was a full disk, not an I/O error."""
    import shutil

    ckpt = tmp_path / "checkpoints"
    real_usage = shutil.disk_usage

    def usage(path):  # full while the partial staging file is there
        full = any(p.name.startswith(".staging") for p in ckpt.iterdir())
        return shutil._ntuple_diskusage(100, 100, 0) if full else real_usage(path)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    manager = CheckpointManager(ckpt, CheckpointPolicy("loss", "min", 1, 0), is_main=True)

    def write(path: Path) -> None:
        path.write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file")

    with pytest.raises(OSError) as info:
        manager.save(write, step=1, metrics=None)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(ckpt / "latest.pt")
    assert sorted(p.name for p in ckpt.iterdir()) == ["topk"]


# ---------------------------------------------------------------------------
# Corrupt data found while training (issue 22, point 10)


def _half_corrupt_shards(root: Path, n: int = 16) -> Path:
    """Train and val splits where every other sample's image is bytes no decoder reads."""
    import io

    import numpy as np
    from PIL import Image

    from shards.writer import ShardSplitWriter

    def png(i: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((32, 32, 3), i * 7 % 255, np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    splits = {}
    for split in ("train", "val"):
        with ShardSplitWriter(root, split) as w:
            for i in range(n):
                w.write({"__key__": f"{split}{i}", "vis.png": png(i) if i % 2 else b"not a png",
                         "json": {"identity": i % 4, "gender": i % 2}})
        splits[split] = w.close()
    Manifest(splits=splits, identities=["a", "b", "c", "d"], label_schemas={"gender": ["f", "m"]},
             modalities=["json", "vis.png"]).save(root)
    return root


@pytest.mark.parametrize("workers", [0, 1])
def test_too_many_corrupt_samples_is_one_line_exit_1(tmp_path: Path, workers: int) -> None:
    data = _half_corrupt_shards(tmp_path / "data")
    proc = _main(tmp_path, "data.source=shards", f"data.shards={data}", f"data.num_workers={workers}",
                 "data.max_corrupt_fraction=0.1", "train.max_steps=2")
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: training stopped: too many corrupt samples in split "
                                                     "'train'"), proc.stderr[-3000:]
    assert "max_corrupt_fraction=0.1" in errors[0] and "Traceback" not in proc.stderr


def test_nccl_without_gpus_is_one_line_naming_the_node_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    """dist.backend=nccl where no GPU is visible: one line before any process group (not a traceback
    from every rank's init); ``biomtl launch --slurm`` from a login node without GPUs still submits."""
    from dist_train import main as main_mod
    from dist_train.distributed import check_backend_here

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("SLURMD_NODENAME", "gpu07")
    cfg = load_checked_config(FACECOM, [*tiny_overrides(tmp_path), "dist.backend=nccl"])  # the launcher's check: fine
    with pytest.raises(ConfigError, match="dist.backend=nccl needs CUDA GPUs and node gpu07 has none visible"):
        check_backend_here(cfg.dist.backend)
    check_backend_here(load_checked_config(FACECOM, tiny_overrides(tmp_path)).dist.backend)  # auto: gloo here
    capsys.readouterr()
    assert main_mod.run(["--config", str(FACECOM), *tiny_overrides(tmp_path), "dist.backend=nccl"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("error: dist.backend=nccl needs CUDA GPUs and node gpu07")
    assert not (tmp_path / "runs").exists()
