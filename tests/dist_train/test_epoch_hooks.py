"""Generic contract extensions (issue 14): the recipe's ``on_epoch_start`` hook runs
before every epoch with a once-over loader of the training split, validation
pictures can be saved as PNG files, and ``checkpoint.every_epochs`` keeps a
periodic checkpoint at every N-th epoch end."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dist_train.config import load_config
from dist_train.main import train
from recipes.base import register
from tests.recipes.test_example_recipe import TinyRecipe

CALLS: list[tuple[int, int, bool]] = []


@register
class EpochHooked(TinyRecipe):
    name = "tiny_epoch_hooked"

    def on_epoch_start(self, model, epoch, ctx):
        rows = sum(int(b["_valid"].sum()) for b in ctx.loaders["train"])
        CALLS.append((epoch, rows, model.training))

    def validation_images(self, outputs, batch):
        return {"inputs": batch["image"][0].clamp(0, 1)}

    def validation_image_file(self, tag, epoch):
        return f"pictures/{tag}_{epoch:04d}.png"


def test_epoch_hook_picture_files_and_epoch_periodic_checkpoints(tmp_path: Path) -> None:
    from shards.manifest import Manifest

    CALLS.clear()
    cfg = load_config(None, [
        "experiment.name=epochs", f"experiment.output_dir={tmp_path / 'runs'}",
        f"data.synthetic.cache_dir={tmp_path / 'synthetic'}", "data.synthetic.num_identities=4",
        "data.synthetic.samples_per_identity=6", "data.synthetic.image_size=16", "data.synthetic.split_by=sample",
        "data.batch_size=4", f"recipe.name={EpochHooked.name}", "recipe.params.img_size=8", "train.epochs=4",
        "train.val_every_epochs=1", "train.precision=fp32", "checkpoint.every_epochs=2", "checkpoint.monitor=acc",
        "checkpoint.mode=max", "logging.progress=false", "logging.plot=false"])
    train(cfg, None)
    run = next((tmp_path / "runs").iterdir())
    data = next((tmp_path / "synthetic").glob("synthetic-*"))
    n_train = Manifest.load(data).split_size("train")
    assert CALLS == [(e, n_train, False) for e in range(4)]   # every epoch, eval mode, each training sample once
    pictures = sorted(p.name for p in (run / "pictures").iterdir())
    assert pictures == [f"inputs_{e:04d}.png" for e in (1, 2, 3, 4)]
    assert np.asarray(Image.open(run / "pictures" / "inputs_0001.png")).shape[:2] == (8, 8)
    steps_per_epoch = int(run.joinpath("logs", "train_logs.csv").read_text().splitlines()[-1].split(",")[0]) // 4
    periodic = sorted(p.name for p in (run / "checkpoints" / "periodic").iterdir())
    assert periodic == [f"step_{2 * steps_per_epoch * k:08d}.pt" for k in (1, 2)]
