"""The smallest recipe there is, written here and nowhere else, trains under
the unchanged trainer: what docs/architecture.md ("How to add a recipe")
promises. A recipe is one module: Params, transform, model, metrics."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dist_train.config import load_config
from dist_train.main import train
from recipes.base import Metrics, Recipe, get_recipe, recipe_names, register
from recipes.batch import label_column, valid_mask
from recipes.image_input import pick_rgb_image


@dataclass
class TinyParams:
    img_size: int = 16


class TinyNet(nn.Module):
    def __init__(self, num_classes: int, img_size: int):
        super().__init__()
        self.classify = nn.Linear(3 * img_size * img_size, num_classes)

    def forward(self, batch):
        logits = self.classify(batch["image"].flatten(1))
        loss = nn.functional.cross_entropy(logits, batch["identity"])
        return {"loss": loss, "terms": {"ce": loss}, "logits": logits}


class Accuracy(Metrics):
    def __init__(self):
        self.hits: list[np.ndarray] = []

    def update(self, outputs, batch):
        n = outputs["logits"].shape[0]
        pred = outputs["logits"].argmax(1).cpu().numpy()
        self.hits.append((pred == label_column(batch, "identity", n))[valid_mask(batch, n)])

    def state(self):
        return np.concatenate(self.hits)

    @staticmethod
    def compute(states):
        return {"acc": float(np.concatenate(states).mean())}


@register
class TinyRecipe(Recipe):
    name = "tiny_example"
    Params = TinyParams

    def transform(self, sample, train):
        size = self.params.img_size
        img = np.asarray(pick_rgb_image(sample).resize((size, size)), np.float32) / 255.0
        return {"image": torch.from_numpy(img).permute(2, 0, 1),
                "identity": torch.tensor(sample["json"]["identity"], dtype=torch.long)}

    def build_model(self):
        return TinyNet(self.data_info.num_identities, self.params.img_size)

    def new_metrics(self):
        return Accuracy()

    @classmethod
    def validation_metric_names(cls, params):
        return frozenset({"acc"})


def test_a_recipe_defined_in_one_place_trains_under_the_trainer(tmp_path: Path) -> None:
    assert "tiny_example" in recipe_names() and get_recipe("tiny_example") is TinyRecipe
    cfg = load_config(None, [
        "experiment.name=tiny", f"experiment.output_dir={tmp_path / 'runs'}",
        f"data.synthetic.cache_dir={tmp_path / 'synthetic'}", "data.synthetic.num_identities=4",
        "data.synthetic.samples_per_identity=6", "data.synthetic.image_size=16", "data.synthetic.split_by=sample",
        "data.batch_size=4", "recipe.name=tiny_example", "recipe.params.img_size=8", "train.max_steps=2",
        "train.precision=fp32", "checkpoint.monitor=acc", "checkpoint.mode=max",
        "logging.progress=false", "logging.plot=false"])
    metrics = train(cfg, None)
    run = next((tmp_path / "runs").iterdir())
    assert 0.0 <= metrics["acc"] <= 1.0
    assert (run / "checkpoints" / "latest.pt").is_file() and (run / "model.pt").is_file()
    lines = (run / "logs" / "train_logs.csv").read_text().splitlines()
    assert len(lines) == 3 and "ce" in lines[0]          # header + the two optimizer steps
