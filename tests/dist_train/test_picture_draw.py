"""Validation pictures of random rows (issue 26, the ear teacher's collages of random
validation crops): a new draw at every epoch, the same draw for the same (seed, epoch),
drawn on rank 0 with a generator of its own, so neither the global RNGs nor training move."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from dist_train.config import load_config
from dist_train.main import train
from dist_train.picture_draw import PictureDraw
from recipes.base import register
from tests.recipes.test_example_recipe import TinyNet, TinyRecipe


def _batches(n_batches: int = 10, size: int = 8, padded_last: int = 3):
    """Batches whose rows say their position (``pos``), the last one with padding rows."""
    out, pos = [], 0
    for b in range(n_batches):
        valid = torch.ones(size, dtype=torch.bool)
        if b == n_batches - 1:
            valid[size - padded_last:] = False
        ids = torch.arange(pos, pos + size)
        out.append(({"twice": 2 * ids, "loss": torch.tensor(1.0), "terms": {"x": torch.tensor(0.0)}},
                    {"pos": ids, "image": ids.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2), "_valid": valid}))
        pos += size
    return out


def _draw(seed: int, epoch: int, k: int = 5, batches=None) -> PictureDraw:
    d = PictureDraw(k, seed, epoch)
    for outputs, batch in batches or _batches():
        d.offer(outputs, batch)
    return d


def test_a_draw_is_the_same_for_the_same_seed_and_epoch_and_new_for_another_epoch():
    first = _draw(0, 1).positions()
    assert first == _draw(0, 1).positions()                      # reproducible: a resumed run draws the same
    epochs = [tuple(_draw(0, e).positions()) for e in range(1, 9)]
    assert len(set(epochs)) == len(epochs)                       # a new draw at every epoch
    assert tuple(_draw(1, 1).positions()) != epochs[0]           # and another seed draws others
    assert all(len(p) == 5 and list(p) == sorted(set(p)) for p in epochs)
    # not the first batch: rows come from the whole validation pass
    assert max(max(p) for p in epochs) >= 8


def test_the_drawn_rows_are_whole_rows_in_loader_order_never_padding():
    batches = _batches()
    n_valid = 10 * 8 - 3
    seen = set()
    for epoch in range(60):
        outputs, batch = _draw(3, epoch, batches=batches).result()
        pos = batch["pos"].tolist()
        assert pos == sorted(pos) and len(pos) == 5 and max(pos) < n_valid   # padding rows are never drawn
        assert torch.equal(outputs["twice"], 2 * batch["pos"])                # outputs of the same rows
        assert torch.equal(batch["image"][:, 0, 0, 0], batch["pos"].float())
        assert "loss" not in outputs and "terms" not in outputs and "_valid" in batch
        seen.update(pos)
    # every valid row can be drawn (a uniform draw: 60 x 5 of 77 rows leave ~1 unseen on average)
    assert len(seen) >= n_valid - 6


def test_drawing_moves_no_global_rng():
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    _draw(0, 2)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


class NoisyNet(TinyNet):
    """Training draws from the global RNG (as dropout does): a draw that moved it would
    change the weights."""

    def forward(self, batch):
        if self.training:
            batch = {**batch, "image": batch["image"] + 0.1 * torch.randn_like(batch["image"])}
        return super().forward(batch)


DRAWN: list[list[float]] = []


@register
class DrawingRecipe(TinyRecipe):
    name = "tiny_picture_draw"
    rows = 3

    def build_model(self):
        return NoisyNet(self.data_info.num_identities, self.params.img_size)

    def validation_picture_rows(self):
        return self.rows

    def validation_images(self, outputs, batch):
        DRAWN.append(batch["image"].flatten(1).sum(1).tolist())   # which rows: their pixel sums
        return {"rows": batch["image"][0].clamp(0, 1)}


@register
class FirstBatchRecipe(DrawingRecipe):
    name = "tiny_picture_first_batch"
    rows = 0


def _train(tmp_path: Path, name: str, recipe: str, *extra: str, resume: Path | None = None, clear: bool = True):
    if clear:
        DRAWN.clear()
    cfg = load_config(None, [
        f"experiment.name={name}", f"experiment.output_dir={tmp_path / 'runs'}",
        f"data.synthetic.cache_dir={tmp_path / 'synthetic'}", "data.synthetic.num_identities=4",
        "data.synthetic.samples_per_identity=12", "data.synthetic.image_size=16", "data.synthetic.split_by=sample",
        "data.batch_size=4", f"recipe.name={recipe}", "recipe.params.img_size=8", "train.epochs=3",
        "train.val_every_epochs=1", "train.precision=fp32", "checkpoint.monitor=acc", "checkpoint.mode=max",
        "logging.progress=false", "logging.plot=false", *extra])
    train(cfg, resume)
    run = next((tmp_path / "runs").glob(f"{name}_*"))
    return torch.load(run / "model.pt", weights_only=True)["model"] if (run / "model.pt").exists() else run


def test_the_trainer_draws_new_rows_each_epoch_reproducibly_and_training_is_unchanged(tmp_path: Path) -> None:
    weights = _train(tmp_path, "a", DrawingRecipe.name)
    drawn = list(DRAWN)
    assert len(drawn) == 3 and all(len(d) == 3 for d in drawn)
    assert drawn[0] != drawn[1] or drawn[1] != drawn[2]           # not the same rows every epoch
    again = _train(tmp_path, "b", DrawingRecipe.name)
    assert DRAWN == drawn                                         # the same run draws the same rows
    plain = _train(tmp_path, "c", FirstBatchRecipe.name)
    assert DRAWN[0] == DRAWN[1] == DRAWN[2]                       # (the first batch: the same every time)
    for k in weights:                                             # the draw moved no RNG the training uses
        assert torch.equal(weights[k], again[k]) and torch.equal(weights[k], plain[k]), k


def test_a_resumed_run_draws_the_rows_the_uninterrupted_one_drew(tmp_path: Path) -> None:
    """Stopped in the middle of epoch 2 and resumed: the validations after epochs 1, 2 and 3
    show the rows of the run that never stopped (the draw depends on seed and epoch only)."""
    _train(tmp_path, "whole", DrawingRecipe.name)
    whole = list(DRAWN)
    run = next((tmp_path / "runs").glob("whole_*"))
    steps = int(run.joinpath("logs", "train_logs.csv").read_text().splitlines()[-1].split(",")[0])
    stopped = _train(tmp_path, "cut", DrawingRecipe.name, f"train.stop_at_step={steps // 2}")
    assert len(DRAWN) == 1                                        # epoch 1's validation, then the stop
    _train(tmp_path, "cut", DrawingRecipe.name, resume=stopped / "checkpoints" / "latest.pt", clear=False)
    assert DRAWN == whole
