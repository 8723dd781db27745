"""``recipe.params.init_from`` (recipes/init_weights.py) in both recipes: what loads,
what is skipped, and the one-line errors before any run directory exists."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from dist_train.config import ConfigError, build_dataclass
from recipes.base import DataInfo, get_recipe
from recipes.init_weights import InitFromError, load_init_weights
from tests.conftest import REPO, tiny_overrides

SMALL_RESNET = {"channels": [8, 16, 16, 16], "stem_width": 8}


def info(n: int) -> DataInfo:
    return DataInfo(identities=tuple(f"p{i}" for i in range(n)), twin_pairs=(), label_schemas={},
                    modalities=("png", "json"))


def recipe(name: str, n_ids: int, **params):
    cls = get_recipe(name)
    base = ({"backbone": "resnet18", "backbone_kwargs": SMALL_RESNET, "img_size": 32, "embedding_dim": 16}
            if name == "facecom" else {"img_size": 32, "patch_size": 8, "depth": 2})
    base.update(params)
    return cls(build_dataclass(cls.Params, base, prefix="recipe.params"), info(n_ids))


def start_check(name: str, n_ids: int, **params) -> None:
    """What the preflight of a fresh run checks of the start files (the recipe's check_start_files)."""
    from dist_train.preflight import check_recipe_start

    check_recipe_start(name, recipe(name, n_ids, **params).params)


def save_model(path: Path, model: torch.nn.Module, recipe_name: str) -> Path:
    """What the trainer exports as RUN/model.pt: the state dict plus the config."""
    torch.save({"model": model.state_dict(), "config": {"recipe": {"name": recipe_name}}, "data_info": {}}, path)
    return path


@pytest.mark.parametrize("name, heads", [("facecom", ("identity_head.weight",)),
                                         ("dcal_twins", ("head_sa.weight", "head_glca.weight"))])
def test_backbone_loads_and_identity_heads_of_another_size_keep_their_init(tmp_path, caplog, name, heads):
    torch.manual_seed(0)
    source = recipe(name, 12).build_model()  # "pretrained" on 12 identities
    path = save_model(tmp_path / "model.pt", source, name)
    torch.manual_seed(1)
    fresh = recipe(name, 5).build_model()    # what the fine-tuning run would start from without init_from
    torch.manual_seed(1)
    with caplog.at_level(logging.INFO, logger="biomtl.init_from"):
        model = recipe(name, 5, init_from=str(path)).build_model()
    src, got, new = source.state_dict(), model.state_dict(), fresh.state_dict()
    backbone = [k for k in got if not k.startswith(("identity_head", "gender_head", "head_", "loss_weights"))]
    assert len(backbone) > 10
    for k in backbone:  # backbone (and neck / GLCA block) = the file's, not the fresh init
        assert torch.equal(got[k], src[k]), k
    assert any(not torch.equal(src[k], new[k]) for k in backbone if src[k].is_floating_point())
    for k in heads:      # 12 vs 5 classes: skipped, fresh initialisation kept
        assert got[k].shape[0] == 5 and torch.equal(got[k], new[k]), k
    assert any(h in r.getMessage() and "keep their fresh" in r.getMessage() for r in caplog.records for h in heads)


def test_heads_of_the_same_shape_are_loaded(tmp_path):
    source = recipe("facecom", 5).build_model()
    path = save_model(tmp_path / "model.pt", source, "facecom")
    model = recipe("facecom", 5, init_from=str(path)).build_model()
    assert torch.equal(model.identity_head.weight, source.identity_head.weight)


def test_backbone_shape_mismatch_is_one_config_line_naming_the_first_tensor(tmp_path):
    other = recipe("facecom", 5, backbone_kwargs={"channels": [8, 16, 16, 32], "stem_width": 8}).build_model()
    path = save_model(tmp_path / "model.pt", other, "facecom")
    with pytest.raises(ConfigError) as exc:  # raised by the preflight, before any run
        start_check("facecom", 5, init_from=str(path))
    msg = str(exc.value)
    assert "\n" not in msg and "init_from" in msg
    assert "backbone.layer4.0.conv1.weight is [32, 16, 3, 3] in the file but [16, 16, 3, 3]" in msg


def test_dcal_depth_mismatch_names_the_missing_block(tmp_path):
    path = save_model(tmp_path / "model.pt", recipe("dcal_twins", 4, depth=1).build_model(), "dcal_twins")
    with pytest.raises(ConfigError, match=r"vit\.blocks\.1\.\S+ \[.*\] is not in the file"):
        start_check("dcal_twins", 4, depth=2, init_from=str(path))


def test_a_file_of_another_recipe_is_refused(tmp_path):
    path = save_model(tmp_path / "model.pt", recipe("facecom", 5).build_model(), "facecom")
    with pytest.raises(ConfigError, match="a facecom model; this recipe is dcal_twins"):
        start_check("dcal_twins", 5, init_from=str(path))


class NotAWeight:
    pass


def test_pickled_code_and_folders_are_refused(tmp_path):
    state = recipe("facecom", 5).build_model().state_dict()
    torch.save({"model": state, "extra": NotAWeight()}, tmp_path / "pickled.pt")
    with pytest.raises(ConfigError, match="not a weights-only torch file"):
        start_check("facecom", 5, init_from=str(tmp_path / "pickled.pt"))
    with pytest.raises(InitFromError, match="a folder; pass its model file"):
        load_init_weights(torch.nn.Linear(1, 1), str(tmp_path), ())
    torch.save({"weights": state}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="no model state dict"):
        start_check("facecom", 5, init_from=str(tmp_path / "other.pt"))


def test_init_from_and_pretrained_weights_exclude_each_other(tmp_path):
    path = save_model(tmp_path / "model.pt", recipe("facecom", 5).build_model(), "facecom")
    with pytest.raises(ConfigError, match="drop pretrained"):
        recipe("facecom", 5, init_from=str(path), pretrained=True)


def test_trainer_runs_from_a_previous_runs_model_file(tmp_path):
    """End to end: a run on 8 synthetic identities, then a run on 6 others that
    starts from its RUN/model.pt; a bad init_from is exit 2 with nothing written."""
    from dist_train.main import run

    small = ["recipe.params.backbone_kwargs={channels: [8, 16, 16, 16], stem_width: 8}", "train.max_steps=1",
             "train.epochs=1"]
    first = tmp_path / "first"
    assert run(["--config", str(REPO / "configs" / "facecom.yaml"), *tiny_overrides(first), *small]) == 0
    (model_file,) = (first / "runs").glob("*/model.pt")
    second = tmp_path / "second"
    args = tiny_overrides(second, data__synthetic__num_identities=6) + small
    assert run(["--config", str(REPO / "configs" / "facecom.yaml"), *args,
                f"recipe.params.init_from={model_file}"]) == 0
    assert len(list((second / "runs").glob("*/model.pt"))) == 1

    third = tmp_path / "third"
    wrong = ["recipe.params.backbone_kwargs={channels: [8, 16, 16, 32], stem_width: 8}", "train.max_steps=1"]
    assert run(["--config", str(REPO / "configs" / "facecom.yaml"), *tiny_overrides(third), *wrong,
                f"recipe.params.init_from={model_file}"]) == 2
    assert not (third / "runs").exists()


def test_dcal_from_a_plain_vit_run_copies_glca_from_the_loaded_last_block(tmp_path, caplog):
    """DCAL's GLCA block starts as a copy of the last SA block: started from a
    plain-ViT run (no GLCA weights in the file) it is copied from the loaded one."""
    torch.manual_seed(0)
    vit = recipe("dcal_twins", 9, use_glca=False, use_pwca=False).build_model()
    path = save_model(tmp_path / "vit.pt", vit, "dcal_twins")
    torch.manual_seed(1)
    with caplog.at_level(logging.INFO, logger="biomtl.dcal"):
        dcal = recipe("dcal_twins", 4, init_from=str(path)).build_model()
    last = vit.vit.blocks[-1].state_dict()
    for k, v in dcal.glca_block.state_dict().items():
        assert torch.equal(v, last[k]), k
    assert torch.equal(dcal.glca_norm.weight, vit.vit.norm.weight)
    assert any("copy of the loaded last block" in r.getMessage() for r in caplog.records)
    # and back: a plain ViT from the DCAL run's file ignores the GLCA weights
    dcal_file = save_model(tmp_path / "dcal.pt", dcal, "dcal_twins")
    again = recipe("dcal_twins", 4, use_glca=False, use_pwca=False, init_from=str(dcal_file)).build_model()
    assert torch.equal(again.vit.blocks[0].attn.qkv.weight, vit.vit.blocks[0].attn.qkv.weight)
