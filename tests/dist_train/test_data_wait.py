"""Issue 23: the step log shows how long each optimizer step waited for the
loader (time blocked in ``next`` of the training loader, summed over the
window's micro-batches) and which fraction of the step that was, so a starved
accelerator is visible without a profiler."""
from __future__ import annotations

import csv
import time
from pathlib import Path

from dist_train.config import load_config
from dist_train.main import train
from recipes.base import register
from tests.recipes.test_example_recipe import TinyRecipe

BATCH = 4
ACCUM = 2
SAMPLE_SLEEP_S = 0.04  # per training sample in the loader: 0.16 s per micro-batch, far above the step's own work
# even on a loaded machine (at 0.01 s a CI run under load saw a wait fraction of 0.46)
FORWARD_SLEEP_S = 0.05  # per training forward of the "fast loader" run: the step's own work


@register
class SlowLoaderRecipe(TinyRecipe):
    name = "tiny_slow_loader"

    def transform(self, sample, train):
        if train:  # runs in the loader (num_workers=0: in the training process, inside next())
            time.sleep(SAMPLE_SLEEP_S)
        return super().transform(sample, train)


@register
class SlowModelRecipe(TinyRecipe):
    name = "tiny_slow_model"

    def build_model(self):
        model = super().build_model()
        inner = model.forward

        def forward(batch):
            if model.training:
                time.sleep(FORWARD_SLEEP_S)
            return inner(batch)

        model.forward = forward
        return model


def _rows(tmp_path: Path, recipe: str) -> list[dict[str, str]]:
    cfg = load_config(None, [
        "experiment.name=wait", f"experiment.output_dir={tmp_path / 'runs'}",
        f"data.synthetic.cache_dir={tmp_path / 'synthetic'}", "data.synthetic.num_identities=4",
        "data.synthetic.samples_per_identity=6", "data.synthetic.image_size=16", "data.synthetic.split_by=sample",
        f"data.batch_size={BATCH}", "data.num_workers=0", "data.val_split=none", f"recipe.name={recipe}",
        "recipe.params.img_size=8", "train.epochs=1", f"train.grad_accum={ACCUM}", "train.log_every_steps=1",
        "train.precision=fp32", "logging.progress=false", "logging.plot=false", "logging.tracking=none"])
    train(cfg, None)
    run = next((tmp_path / "runs").iterdir())
    with (run / "logs" / "train_logs.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_a_slow_loader_shows_its_wait_per_step(tmp_path: Path) -> None:
    rows = _rows(tmp_path, SlowLoaderRecipe.name)
    assert len(rows) >= 2
    for row in rows[:-1]:  # full windows: ACCUM micro-batches of BATCH slow samples each
        assert float(row["data_s"]) >= ACCUM * BATCH * SAMPLE_SLEEP_S
        assert 0.0 < float(row["data_fraction"]) <= 1.0
        assert float(row["data_s"]) <= float(row["step_s"])
    assert float(rows[-1]["data_s"]) >= BATCH * SAMPLE_SLEEP_S  # the last window may be one micro-batch
    # the step's own work is a linear layer on 4 images: the wait is most of it
    assert max(float(r["data_fraction"]) for r in rows) > 0.5


def test_a_fast_loader_shows_a_small_fraction(tmp_path: Path) -> None:
    rows = _rows(tmp_path, SlowModelRecipe.name)
    assert len(rows) >= 2
    for row in rows:
        assert float(row["step_s"]) >= ACCUM * FORWARD_SLEEP_S * 0.5  # (the last window may be one micro-batch)
        assert 0.0 <= float(row["data_s"]) <= float(row["step_s"])
    # in-memory decoding of 4 tiny PNGs against >= 50 ms of forward per micro-batch
    assert min(float(r["data_fraction"]) for r in rows) < 0.2
    assert sorted(float(r["data_fraction"]) for r in rows)[len(rows) // 2] < 0.3


def test_the_interval_line_shows_the_wait(tmp_path: Path, caplog) -> None:
    import logging

    from dist_train.run_logging import RunLogger

    logger = RunLogger(tmp_path, 4, 0, False, False, False, tracking="none")
    with caplog.at_level(logging.INFO, logger="biomtl"):
        logger.log_train(1, 0, {"loss": 1.0, "lr": 0.1, "samples_per_s": 10.0, "step_s": 0.2, "data_s": 0.05,
                                "data_fraction": 0.25})
    logger.close()
    assert "data 0.050 s/step (25%)" in caplog.text
