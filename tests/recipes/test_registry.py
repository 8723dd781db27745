"""The recipe registry is strict (a name is one recipe) and says what the
inference commands need of a model (recipes.base.EmbeddingModel), checked when
a command starts, in one line naming the recipe."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from recipes.base import EmbeddingModel, Recipe, get_recipe, has_attention_rollout, register


@dataclass
class _NoParams:
    pass


class _NoEmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Linear(2, 2)

    def forward(self, batch):
        return {"loss": self.w.weight.sum(), "terms": {}}


@register
class _NoEmbedRecipe(Recipe):
    name = "test_no_embed"
    Params = _NoParams

    def build_model(self):
        return _NoEmbedNet()

    @classmethod
    def validation_metric_names(cls, params):
        return frozenset({"never"})


def test_a_taken_name_is_an_error_and_keeps_the_first_recipe():
    facecom = get_recipe("facecom")

    class Impostor(Recipe):
        name = "facecom"
        Params = _NoParams

    with pytest.raises(ValueError, match=r"recipe name 'facecom' is taken by recipes\.facecom\.FaceComRecipe"):
        register(Impostor)
    assert get_recipe("facecom") is facecom
    assert register(facecom) is facecom  # the same class again (a module reloaded) is no conflict


def test_the_protocol_says_what_inference_needs():
    assert not isinstance(_NoEmbedNet(), EmbeddingModel)

    class WithEmbed(_NoEmbedNet):
        def embed(self, images):
            return images.flatten(1)

    assert isinstance(WithEmbed(), EmbeddingModel) and not has_attention_rollout(WithEmbed())


def test_a_command_on_a_model_without_embed_is_one_line_naming_the_recipe(tmp_path, capsys):
    from dist_train.commands import verify_cmd
    from dist_train.config import load_config, resolved_config_dict
    from recipes.base import DataInfo
    from recipes.model_file import model_file

    cfg = load_config(None, ["recipe.name=test_no_embed"])
    info = DataInfo(identities=("a",), twin_pairs=(), label_schemas={}, modalities=("png",))
    path = tmp_path / "model.pt"
    torch.save(model_file(_NoEmbedNet().state_dict(), resolved_config_dict(cfg), info.to_dict()), path)
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    rc = verify_cmd.run(["--checkpoint", str(path), str(image), str(image), "--device", "cpu"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    assert "recipe 'test_no_embed'" in err[0] and "embed(images)" in err[0]
