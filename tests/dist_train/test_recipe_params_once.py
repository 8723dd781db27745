"""Recipe params are resolved once, when the config is loaded, and travel with
it; the start-only files are read once, by the preflight of a fresh run, and
not at all when the run resumes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_train.config import ConfigError, dump_config, load_config, recipe_params, resolved_config_dict
from dist_train.preflight import load_checked_config
from recipes.base import DataInfo, get_recipe
from tests.conftest import REPO, tiny_overrides

FACECOM = REPO / "configs" / "facecom.yaml"


def _init_file(tmp_path: Path) -> Path:
    cfg = load_config(FACECOM, tiny_overrides(tmp_path))
    info = DataInfo(identities=("a", "b"), twin_pairs=(), label_schemas={}, modalities=("png", "json"))
    path = tmp_path / "init.pt"
    model = get_recipe("facecom")(recipe_params(cfg), info).build_model()
    torch.save({"model": model.state_dict(), "config": {"recipe": {"name": "facecom"}}}, path)
    return path


def test_params_are_made_once_and_the_init_file_read_once(tmp_path, monkeypatch):
    import recipes.init_weights as iw

    path = _init_file(tmp_path)
    reads = []
    real = iw.read_init_state
    monkeypatch.setattr(iw, "read_init_state", lambda *a, **k: reads.append(a) or real(*a, **k))
    cfg = load_checked_config(FACECOM, tiny_overrides(tmp_path, recipe__params__init_from=str(path)))
    params = recipe_params(cfg)
    assert params is cfg.recipe.resolved and params.init_from == str(path)
    for _ in range(3):  # what every checkpoint save stores
        assert resolved_config_dict(cfg)["recipe"]["params"]["init_from"] == str(path)
        assert recipe_params(cfg) is params
    assert len(reads) == 1
    assert "resolved" not in dump_config(cfg)


def test_a_resume_needs_no_start_file_and_keeps_its_name(tmp_path, monkeypatch):
    import recipes.init_weights as iw

    gone = tmp_path / "gone" / "model.pt"
    overrides = tiny_overrides(tmp_path, recipe__params__init_from=str(gone))
    with pytest.raises(ConfigError, match="recipe.params.init_from: path does not exist"):
        load_checked_config(FACECOM, overrides)  # a fresh start needs it
    monkeypatch.setattr(iw, "read_init_state", lambda *a, **k: pytest.fail("read on resume"))
    cfg = load_checked_config(FACECOM, overrides, start=False)
    assert recipe_params(cfg).init_from == str(gone)  # the record of where the run started


def test_resolved_is_not_a_config_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'recipe.resolved'"):
        load_config(FACECOM, tiny_overrides(tmp_path, recipe__resolved=1))
