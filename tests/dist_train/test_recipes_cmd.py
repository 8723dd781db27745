"""``biomtl recipes`` lists what the registry holds: each recipe, what it trains, its
configs and its params with defaults and the help its Params dataclass carries."""
from __future__ import annotations

import dataclasses

from torch import nn

from dist_train.cli import main as biomtl
from recipes import base


def test_every_registered_recipe_with_its_params_defaults_and_configs(capsys) -> None:
    assert biomtl(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in base.recipe_names():
        assert f"\n{name}: " in "\n" + out, name
        for f in dataclasses.fields(base.get_recipe(name).Params):
            assert f"    {f.name}: " in out, (name, f.name)
    facecom = out.split("\nfacecom: ", 1)[1].split("\n\n", 1)[0]
    assert facecom.startswith("FaceCom recipe: gender + identity")
    assert "configs/facecom.yaml" in facecom and "configs/face_verification/cnn.yaml" in facecom
    assert "    alpha: float = 0.3\n        gender loss weight\n" in facecom  # the field's own comment
    assert "init_from: str = '' [start only" in facecom


def test_a_new_recipe_shows_up_without_any_list(monkeypatch, capsys) -> None:
    @dataclasses.dataclass
    class Params:
        # How wide the probe is.
        width: int = 7
        depth: float = 0.5  # layers per block

    class Probe(base.Recipe):
        """Trains a probe for this test."""
        name = "probe_for_test"

        def build_model(self) -> nn.Module:
            return nn.Identity()

    Probe.Params = Params
    monkeypatch.setitem(base._REGISTRY, Probe.name, Probe)
    assert biomtl(["recipes", "probe_for_test"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "probe_for_test: Trains a probe for this test.", "  configs: (none shipped)",
        "  params (recipe.params.NAME=VALUE):", "    width: int = 7", "        How wide the probe is.",
        "    depth: float = 0.5", "        layers per block"]


def test_help_mentions_recipes_and_unknown_name_is_one_line(capsys) -> None:
    assert biomtl(["--help"]) == 0
    assert "biomtl recipes" in capsys.readouterr().out
    assert biomtl(["recipes", "facecomm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown recipe 'facecomm'" in err[0]
