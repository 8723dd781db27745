"""The optional recipe hooks the trainer honours without knowing the recipe:
pictures of the first validation batch go to TensorBoard at every validation,
and ``export_for_inference`` decides what ``model.pt`` holds (a student
without its teacher)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dist_train.config import load_config
from dist_train.export import load_exported
from dist_train.main import train
from recipes.base import register
from tests.recipes.test_example_recipe import TinyNet, TinyRecipe


class TeacherStudent(nn.Module):
    """A student (what inference runs) trained next to a teacher it never needs later."""

    def __init__(self, num_classes: int, img_size: int):
        super().__init__()
        self.student = TinyNet(num_classes, img_size)
        self.teacher = nn.Linear(3, 3)

    def forward(self, batch):
        out = self.student(batch)
        out["loss"] = out["loss"] + 0.0 * self.teacher.weight.sum()
        return out


@register
class PicturedDistilled(TinyRecipe):
    name = "tiny_pictured_distilled"

    def build_model(self):
        return TeacherStudent(self.data_info.num_identities, self.params.img_size)

    def validation_images(self, outputs, batch):
        return {"inputs": batch["image"][0].clamp(0, 1)}

    def export_for_inference(self, state_dict):
        student = {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")}
        return TinyRecipe.name, self.params, student


def _overrides(tmp_path: Path) -> list[str]:
    return ["experiment.name=hooks", f"experiment.output_dir={tmp_path / 'runs'}",
            f"data.synthetic.cache_dir={tmp_path / 'synthetic'}", "data.synthetic.num_identities=4",
            "data.synthetic.samples_per_identity=6", "data.synthetic.image_size=16",
            "data.synthetic.split_by=sample", "data.batch_size=4", f"recipe.name={PicturedDistilled.name}",
            "recipe.params.img_size=8", "train.max_steps=4", "train.val_every_steps=2", "train.precision=fp32",
            "checkpoint.monitor=acc", "checkpoint.mode=max", "logging.progress=false", "logging.plot=false"]


def test_validation_pictures_and_the_exported_student(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(load_config(None, _overrides(tmp_path)), None)
    run = next((tmp_path / "runs").iterdir())
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0}).Reload()
    steps = [e.step for e in events.Images("val/inputs")]
    assert steps == [2, 4]                                    # every validation, the same tag
    exported = torch.load(run / "model.pt", weights_only=True)
    assert exported["config"]["recipe"]["name"] == TinyRecipe.name
    assert set(exported["model"]) == {"classify.weight", "classify.bias"}   # no teacher tensors
    model, cfg, _ = load_exported(run / "model.pt")             # rebuilt as the student's recipe
    assert cfg.recipe.name == TinyRecipe.name and isinstance(model, TinyNet)
