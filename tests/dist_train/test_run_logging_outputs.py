"""What a run leaves for TensorBoard beyond scalars, read back with TensorBoard's
own reader: the resolved config as text, the config flattened as hparams with
the final metrics, and every PNG the run wrote (plots, the recipe's pictures and
reports) as images at the validation that wrote it and at the end. Tables in a
log file are not cut at 80 columns."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dist_train.run_logging import RunLogger
from tests.conftest import REPO

CONFIG = """experiment:
  name: toy
train:
  lr: 0.001
  epochs: 3
  precision: fp32
recipe:
  name: dcal_twins
  params:
    depth: 2
"""


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 8, 3), value, np.uint8)).save(path)


def _events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_holds_config_text_hparams_and_the_pictures_of_each_validation(tmp_path: Path) -> None:
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tmp_path / "toy_20260101-000000"
    run.mkdir()
    (run / "config.yaml").write_text(CONFIG)
    _png(run / "plots" / "old.png", 9)                 # a resumed run's: logged by the run that wrote it
    logger = RunLogger(run, total_steps=4, start_step=0, tensorboard=True, progress=False, plot=False,
                       tracking="tensorboard")
    logger.log_train(2, 0, {"loss": 1.0, "lr": 0.001})
    _png(run / "reconstruction_collages" / "epoch_0001.png", 50)
    logger.log_validation(2, 0, {"loss": 0.9, "eer": 0.25})
    logger.log_pictures(2)
    logger.log_train(4, 1, {"loss": 0.5, "lr": 0.001})
    _png(run / "reconstruction_collages" / "epoch_0002.png", 60)
    logger.log_validation(4, 1, {"loss": 0.4, "eer": 0.125})
    logger.log_pictures(4)
    _png(run / "eval" / "test" / "roc.png", 200)       # written by the recipe's report after training
    logger.log_validation(4, 1, {"eer": 0.5}, split="test")
    logger.close()

    acc = _events(run)
    images = acc.Tags()["images"]
    assert set(images) == {"pictures/reconstruction_collages/epoch_0001", "pictures/reconstruction_collages/epoch_0002",
                           "pictures/eval/test/roc"}
    assert [e.step for e in acc.Images("pictures/reconstruction_collages/epoch_0001")] == [2]
    assert [e.step for e in acc.Images("pictures/eval/test/roc")] == [4]
    roc = acc.Images("pictures/eval/test/roc")[0]
    assert (roc.width, roc.height) == (8, 6)

    text = acc.PluginTagToContent("text")
    assert "config/text_summary" in text
    (event,) = acc.Tensors("config/text_summary")
    assert "depth: 2" in event.tensor_proto.string_val[0].decode()

    hp = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["recipe.params.depth"].number_value == 2
    assert start.hparams["train.lr"].number_value == 0.001 and start.hparams["recipe.name"].string_value == "dcal_twins"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"val/loss", "val/eer", "test/eer"}
    assert [e.value for e in acc.Scalars("val/eer")] == [0.25, 0.125]   # the metrics the hparams view reads


def test_a_table_in_a_log_file_is_not_cut_at_80_columns(tmp_path: Path) -> None:
    """Not a terminal (a SLURM/CI log): a metric row keeps its whole name and value."""
    long_name = "lfw_" + "x" * 90 + "_tar_at_far_1e-4"
    code = ("import sys; from pathlib import Path; from dist_train.run_logging import RunLogger;"
            f"RunLogger(Path(sys.argv[1]), 1, 0, False, False, False, tracking='none')"
            f".log_validation(1, 0, {{'{long_name}': 0.123456}})")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "COLUMNS": ""})
    assert proc.returncode == 0, proc.stderr
    assert any(long_name in line and "0.1235" in line for line in proc.stderr.splitlines()), proc.stderr
