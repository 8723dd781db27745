"""Distillation from a frozen teacher in the DCAL recipe (recipe.params.distill_*): the teacher
is any biomtl model file, rebuilt by dist_train.inference.load_frozen_model; it stays frozen while
the student trains, is in no state dict, and a bad teacher or bad params are one line, exit 2."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from dist_train.config import ConfigError, build_dataclass, load_config, resolved_config_dict
from dist_train.inference import InferenceEngine, load_frozen_model, save_exported
from dist_train.stored_recipe import build_recipe
from recipes.base import DataInfo, get_recipe
from tests.conftest import PYTHON, REPO, tiny_overrides

SMALL_RESNET = "{channels: [8, 8, 16, 16], stem_width: 8}"
DCAL_TINY = {"backbone": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 2, "top_r": 0.3}


def info(n: int) -> DataInfo:
    return DataInfo(identities=tuple(f"p{i}" for i in range(n)), twin_pairs=(), label_schemas={},
                    modalities=("png", "json"))


@pytest.fixture
def teacher_file(tmp_path):
    """A FaceCom CNN's model.pt as the trainer exports it (stored config + data info)."""
    cfg = load_config(REPO / "configs" / "facecom.yaml",
                      tiny_overrides(tmp_path, recipe__params__backbone_kwargs=SMALL_RESNET,
                                     recipe__params__embedding_dim=16))
    data = info(4)
    torch.manual_seed(3)
    model = build_recipe(cfg, data, weights_from_checkpoint=True).build_model()
    return save_exported(tmp_path / "teacher" / "model.pt", model.state_dict(), resolved_config_dict(cfg),
                         data.to_dict())


def dcal(n_ids: int, **params):
    cls = get_recipe("dcal_twins")
    return cls(build_dataclass(cls.Params, {**DCAL_TINY, **params}, prefix="recipe.params"), info(n_ids))


def batch(n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
            "identity": torch.arange(n) % 4, "twin": torch.full((n,), -1)}


@pytest.mark.parametrize("target", ["token", "embedding"])
def test_teacher_stays_frozen_while_the_student_trains_and_is_in_no_state_dict(teacher_file, target):
    recipe = dcal(4, distill_teacher=str(teacher_file), distill_weight=1.0, distill_target=target)
    recipe.frozen_model_loader = load_frozen_model  # what the trainer sets
    model = recipe.build_model()
    teacher = model._teacher[0]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}  # weights and BatchNorm statistics
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    model.train()
    for _ in range(3):
        out = model(batch())
        assert "distill" in out["terms"] and out["terms"]["distill"] > 0
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(k.startswith("_teacher") or "teacher" in k for k in model.state_dict())
    assert {id(p) for p in teacher.parameters()}.isdisjoint(id(p) for p in model.parameters())


def test_loss_is_the_recipe_loss_plus_weight_times_the_distillation_term(teacher_file):
    torch.manual_seed(0)
    plain = dcal(4, distill_weight=0.7, distill_teacher=str(teacher_file)).build_model()  # no loader: no teacher
    recipe = dcal(4, distill_teacher=str(teacher_file), distill_weight=0.7)
    recipe.frozen_model_loader = load_frozen_model
    torch.manual_seed(0)
    student = recipe.build_model()
    student.load_state_dict(plain.state_dict())
    plain.train(), student.train()
    torch.manual_seed(5)
    base = plain(batch())
    torch.manual_seed(5)
    out = student(batch())
    assert "distill" not in base["terms"]
    assert torch.equal(out["loss"], base["loss"] + 0.7 * out["terms"]["distill"])  # same kernels, same inputs


def test_distillation_token_is_a_second_prefix_token_and_joins_the_embedding():
    plain = dcal(4).build_model()
    token = dcal(4, distill_weight=1.0, distill_target="token").build_model()
    emb_only = dcal(4, distill_weight=1.0, distill_target="embedding").build_model()
    assert (plain.num_prefix_tokens, token.num_prefix_tokens, emb_only.num_prefix_tokens) == (1, 2, 1)
    x = batch()["image"]
    d = plain.dim
    assert plain.embed(x).shape[1] == 2 * d and token.embed(x).shape[1] == 3 * d
    assert emb_only.embed(x).shape[1] == 2 * d


def test_exported_student_rebuilds_without_its_teacher(tmp_path, teacher_file):
    cfg = load_config(REPO / "configs" / "dcal_twins.yaml",
                      tiny_overrides(tmp_path, **{f"recipe__params__{k}": v for k, v in DCAL_TINY.items()},
                                     recipe__params__distill_teacher=str(teacher_file),
                                     recipe__params__distill_weight=1, recipe__params__distill_target="token"))
    model = build_recipe(cfg, info(4), weights_from_checkpoint=True).build_model()
    path = save_exported(tmp_path / "student.pt", model.state_dict(), resolved_config_dict(cfg), info(4).to_dict())
    teacher_file.unlink()
    engine = InferenceEngine.from_checkpoint(path, "cpu")
    assert engine.model._teacher == [] and engine.embed_tensor(batch()["image"].float() / 255).shape[1] == 3 * model.dim


def dcal_overrides(tmp_path) -> list[str]:
    return tiny_overrides(tmp_path, **{f"recipe__params__{k}": v for k, v in DCAL_TINY.items()})


def _train(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    args = dcal_overrides(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([PYTHON, "dist_train/main.py", "--config", str(REPO / "configs" / "dcal_twins.yaml"),
                           *args, *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("teacher, words", [("missing", "does not exist"), ("garbled", "not a"),
                                            ("foreign", "no 'model'")])
def test_missing_or_garbled_teacher_is_one_line_exit_2_and_nothing_written(tmp_path, teacher, words):
    path = tmp_path / "teacher.pt"
    if teacher == "garbled":
        path.write_bytes(b"PK\x03\x04 not really a zip" * 10)
    elif teacher == "foreign":
        torch.save({"weights": torch.zeros(2)}, path)
    proc = _train(tmp_path, f"recipe.params.distill_teacher={path}", "recipe.params.distill_weight=1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "distill_teacher" in lines[0] and words in lines[0], lines
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("override, words", [
    ("recipe.params.distill_weight=-1", "distill_weight"),
    ("recipe.params.distill_temperature=0", "distill_temperature"),
    ("recipe.params.distill_temperature=1000", "distill_temperature"),
    ("recipe.params.distill_target=logits", "distill_target"),
    ("recipe.params.distill_weight=1", "distill_teacher"),          # a weight without a teacher
])
def test_bad_distillation_params_are_one_config_line(tmp_path, override, words):
    from dist_train.preflight import check_frozen_models

    with pytest.raises(ConfigError) as exc:
        cfg = load_config(REPO / "configs" / "dcal_twins.yaml", [*dcal_overrides(tmp_path), override])
        check_frozen_models(cfg)
    assert "\n" not in str(exc.value) and words in str(exc.value)


def test_teacher_without_weight_is_refused(tmp_path, teacher_file):
    with pytest.raises(ConfigError, match="distill_weight"):
        load_config(REPO / "configs" / "dcal_twins.yaml",
                    [*dcal_overrides(tmp_path), f"recipe.params.distill_teacher={teacher_file}"])


@pytest.mark.integration
def test_a_distilled_run_trains_and_exports_the_student_alone(tmp_path, teacher_file):
    proc = _train(tmp_path, f"recipe.params.distill_teacher={teacher_file}", "recipe.params.distill_weight=1",
                  "recipe.params.distill_target=token", "train.max_steps=2", "train.epochs=1",
                  "train.val_every_epochs=1", "logging.tracking=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    weights = torch.load(run / "model.pt", weights_only=True)["model"]
    assert "vit.reg_token" in weights and not any("teacher" in k for k in weights)
    assert "distill" in (run / "logs" / "train_logs.csv").read_text().splitlines()[0]
