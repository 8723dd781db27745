"""The THz recipes (thz_mtl, thz_distill): configs, params, transform, triplet
batches, distillation, the student-only export, the report, training under
torchrun, and learning on the synthetic THz faces."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from dist_train.config import ConfigError, build_dataclass, load_config, recipe_params
from recipes.base import DataInfo, get_recipe
from shards.synthetic import SyntheticSpec, _sample_fields, render_sample
from tests.conftest import PYTHON, REPO
from tests.tolerance import embedding_cosine_atol, gamma, logsumexp_atol, module_atol, ops_rtol, sum_atol


class _Embed(torch.nn.Module):
    """A model's ``embed`` as its forward (tests/tolerance.py: module_atol runs forward)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images)

MTL_CONFIG = REPO / "configs" / "thz_mtl.yaml"
DISTILL_CONFIG = REPO / "configs" / "thz_distill.yaml"
INFO = DataInfo(identities=tuple(f"p{i}" for i in range(6)), twin_pairs=((0, 1),),
                label_schemas={"posture": ("front", "left", "right", "up", "down")}, modalities=())
TINY = dict(img_size=32, width=4, depth=2, embedding_dim=16, projection_dim=8, projection_hidden=16, fusion_dim=8,
            fusion_heads=2)
TINY_MTL = {k: v for k, v in TINY.items() if not k.startswith("fusion")}


def thz_overrides(tmp_path: Path, **extra: object) -> list[str]:
    """configs/thz_*.yaml as a seconds-long CPU run (tiny network, tiny identity-split synthetic set)."""
    values = {
        "experiment.output_dir": str(tmp_path / "runs"),
        "data.synthetic.cache_dir": str(tmp_path.parent / "synthetic-cache-thz"),
        "data.synthetic.num_identities": 12,
        "data.synthetic.samples_per_identity": 6,
        "data.synthetic.image_size": 32,
        "data.batch_size": 4,
        "recipe.params.img_size": 32,
        "recipe.params.width": 4,
        "recipe.params.depth": 2,
        "recipe.params.embedding_dim": 16,
        "train.precision": "fp32",
        "train.max_steps": 2,
        "train.val_every_steps": 2,
        "train.log_every_steps": 1,
        "logging.progress": "false",
        "logging.plot": "false",
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def _recipe(name: str = "thz_mtl", **params):
    cls = get_recipe(name)
    base = {k: v for k, v in TINY.items() if k in {f.name for f in dataclasses.fields(cls.Params)}}
    base.update(params)
    return cls(build_dataclass(cls.Params, base, prefix="recipe.params"), INFO)


SPEC = SyntheticSpec(num_identities=6, image_size=32, twin_fraction=0.34, modalities=("thz_dense", "vis"))


def _sample(identity: int, index: int) -> dict:
    """A decoded synthetic shard sample (what the stream hands to ``transform``)."""
    f = _sample_fields(SPEC, render_sample(SPEC, identity, index))
    out = {k: Image.fromarray(v) for k, v in f.items() if k.endswith(".png")}
    return {**out, "json": f["json"], "__key__": f"id{identity}_s{index}"}


def _triplet_batch(recipe, anchors=((0, 0), (2, 1), (4, 2)), train=True) -> dict:
    """A triplet batch laid out as shards.batching does (pos_/neg_ fields)."""
    rows = {"": [], "pos_": [], "neg_": []}
    for i, k in anchors:
        rows[""].append(recipe.transform(_sample(i, k), train))
        rows["pos_"].append(recipe.transform(_sample(i, k + 5), train))
        rows["neg_"].append(recipe.transform(_sample((i + 1) % 6, k), train))
    batch = {}
    for role, rs in rows.items():
        batch.update({role + key: v for key, v in default_collate(rs).items()})
    batch["neg_is_co_twin"] = torch.tensor([twin_of(i) == (i + 1) % 6 for i, _ in anchors])   # the batcher's flag
    return batch


def twin_of(identity: int) -> int:
    from shards.synthetic import _world

    return _world(SPEC).twins[identity]


# ----------------------------------------------------------------------------- config and params

def test_configs_are_valid_and_keep_the_best_ssim(tmp_path):
    for path, name in ((MTL_CONFIG, "thz_mtl"), (DISTILL_CONFIG, "thz_distill")):
        cfg = load_config(path, [f"experiment.output_dir={tmp_path}"])
        assert cfg.recipe.name == name and cfg.data.source == "synthetic" and cfg.data.batching == "triplet"
        assert cfg.checkpoint.monitor == "ssim" and cfg.checkpoint.mode == "max"
        assert cfg.train.val_every_epochs == 0.25
        assert "thz_dense" in cfg.data.synthetic.modalities
        p = recipe_params(cfg)
        assert p.encoder == "custom" and p.embedding_dim == 128 and p.gating == "hard" and p.lpips_weight == 0.0
        assert (p.task_weights.verification, p.task_weights.classification, p.task_weights.reconstruction) == (1, 1, 1)
    p = recipe_params(load_config(DISTILL_CONFIG, []))
    assert "vis" in load_config(DISTILL_CONFIG, []).data.synthetic.modalities
    assert p.kd_temperature == 3.0 and p.distill_full_triplet and not p.freeze_teacher
    # issue 30: the default distils the verification similarities, never a term measured to hurt
    assert (p.similarity_weight, p.similarity_temperature, p.distill_source) == (0.5, 0.1, "fused")
    assert (p.feature_weight, p.logit_weight, p.relation_weight, p.teacher_reconstruct) == (0, 0, 0, False)


def test_bad_params_are_one_line_config_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cases = {"recipe.params.ssim_kind=ms_ssim": "MS-SSIM needs images larger than 32",
             "recipe.params.lpips_weight=0.1": "lpips_weight=0",
             "recipe.params.gating=sparse": "gating",
             "recipe.params.task_weights.posture=1": "task_weights.posture",
             "recipe.params.encoder=custom recipe.params.weights_path=" + str(MTL_CONFIG): "timm encoders"}
    for override, needle in cases.items():
        with pytest.raises(ConfigError) as exc:
            load_config(MTL_CONFIG, override.split() + ["recipe.params.img_size=32"])
        assert needle in str(exc.value) and "\n" not in str(exc.value), override
    with pytest.raises(ConfigError) as exc:
        load_config(MTL_CONFIG, ["recipe.params.lpips_weight=0.1"])
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert str(expected) in str(exc.value) and "recipe.params.lpips_weights=FILE" in str(exc.value)
    with pytest.raises(ConfigError, match="fusion_dim"):
        load_config(DISTILL_CONFIG, ["recipe.params.fusion_dim=10", "recipe.params.fusion_heads=4"])
    # the weights file present: accepted (and read from the configured path)
    from torchvision.models import alexnet

    f = tmp_path / "alex.pth"
    torch.save({f"features.{k}": v for k, v in alexnet().features.state_dict().items()}, f)
    p = recipe_params(load_config(MTL_CONFIG, ["recipe.params.lpips_weight=0.1", f"recipe.params.lpips_weights={f}"]))
    assert p.lpips_weight == 0.1


def test_bad_distillation_options_are_one_line_config_errors():
    cases = {"recipe.params.similarity_temperature=0": "similarity_temperature",
             "recipe.params.similarity_weight=-1": "similarity_weight",
             "recipe.params.distill_source=visible": "distill_source",
             "recipe.params.teacher_reconstruct=maybe": "teacher_reconstruct"}
    for override, needle in cases.items():
        with pytest.raises(ConfigError) as exc:
            load_config(DISTILL_CONFIG, [override])
        assert needle in str(exc.value) and "\n" not in str(exc.value), override
    good = recipe_params(load_config(DISTILL_CONFIG, ["recipe.params.similarity_temperature=0.2",
                                                      "recipe.params.distill_source=thz_branch"]))
    assert good.similarity_temperature == 0.2 and good.distill_source == "thz_branch"


def test_a_setting_measured_to_hurt_is_named_in_one_warning_line_at_start(caplog):
    cls = get_recipe("thz_distill")
    hurting = _recipe("thz_distill", logit_weight=1.0, feature_weight=0.5).params
    with caplog.at_level("WARNING", logger="biomtl.thz"):
        cls.check_start_files(hurting)
    lines = [r.getMessage() for r in caplog.records if r.name == "biomtl.thz"]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "logit_weight=1" in lines[0] and "feature_weight=0.5" in lines[0] and "docs/results.md" in lines[0]
    caplog.clear()
    default = recipe_params(load_config(DISTILL_CONFIG, []))        # the shipped default warns of nothing
    quiet = [_recipe("thz_distill", logit_weight=0.0, feature_weight=0.0).params, default,
             _recipe("thz_distill", logit_weight=0.0, feature_weight=1.0, distill_source="thz_branch").params]
    with caplog.at_level("WARNING", logger="biomtl.thz"):
        for params in quiet:
            cls.check_start_files(params)
    assert not [r for r in caplog.records if r.name == "biomtl.thz"]


def test_cli_refuses_missing_lpips_weights_before_starting(tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([PYTHON, "dist_train/main.py", "--config", str(MTL_CONFIG),
                           f"experiment.output_dir={tmp_path / 'runs'}", "recipe.params.lpips_weight=0.5"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "LPIPS" in lines[0] and "lpips_weight=0" in lines[0]
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- transform

def test_transform_reads_thz_target_visible_and_labels():
    r = _recipe("thz_mtl")
    out = r.transform(_sample(1, 2), train=False)
    assert out["image"].shape == (1, 32, 32) and out["target"].shape == (1, 32, 32) and "vis" not in out
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    meta = _sample(1, 2)["json"]
    assert out["identity"].item() == 1 and out["posture"].item() == meta["posture"]
    assert out["concealed"].item() == meta["concealed"] and out["twin"].item() == meta["twin"]
    # eval transform is deterministic; training augments (geometry shared by input and target)
    assert torch.equal(r.transform(_sample(1, 2), False)["image"], out["image"])
    # what InferenceEngine hands over: one bare image, no target, no labels
    bare = r.transform({"png": Image.new("L", (50, 40), 90), "json": {}, "__key__": "x"}, train=False)
    assert bare["image"].shape == (1, 32, 32) and "target" not in bare and bare["identity"].item() == -1
    with pytest.raises(KeyError, match="no THz image"):       # a visible image is never taken for THz
        r.transform({"vis.png": Image.new("RGB", (32, 32)), "json": {}, "__key__": "v"}, train=False)
    d = _recipe("thz_distill")
    assert d.transform(_sample(1, 2), train=True)["vis"].shape == (3, 32, 32)
    no_vis = {k: v for k, v in _sample(1, 2).items() if not k.startswith("vis")}
    assert "vis" not in d.transform(no_vis, train=False)     # evaluation / inference need no visible image
    with pytest.raises(KeyError, match="vis"):
        d.transform(no_vis, train=True)
    assert _recipe("thz_mtl", in_chans=3).transform(_sample(1, 2), False)["image"].shape == (3, 32, 32)


# ----------------------------------------------------------------------------- models on batches

def _rows_seen(module: torch.nn.Module) -> list[int]:
    seen: list[int] = []
    module.register_forward_hook(lambda m, args, out: seen.append(int(args[0].shape[0])))
    return seen


def test_mtl_model_trains_on_anchors_positives_and_negatives():
    r = _recipe("thz_mtl")
    model = r.build_model().train()
    seen = _rows_seen(model.net.encoder)
    batch = _triplet_batch(r)
    out = model(batch)
    assert seen == [9]                                                   # 3 anchors + 3 positives + 3 negatives
    assert out["embedding"].shape == (3, 16) and out["reconstruction"].shape == (3, 1, 32, 32)
    assert set(out["terms"]) == {"supcon", "posture", "reconstruction", "charbonnier", "ssim"}
    assert out["terms"]["supcon"].item() > 0                             # every anchor has its positive
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # co-twins come from the manifest's pairs (INFO: 0 <-> 1), not from the batch's neg_is_co_twin flag
    assert model.co_twins(torch.tensor([0, 1, 2, -1, 99])).tolist() == [1, 0, -1, -1, -1]
    weighted = get_recipe("thz_mtl")(build_dataclass(get_recipe("thz_mtl").Params, {**TINY_MTL,
                                                                                     "twin_negative_weight": 4.0}),
                                     DataInfo(identities=INFO.identities, twin_pairs=((0, 1), (2, 3)),
                                              label_schemas={}, modalities=())).build_model()
    weighted.load_state_dict(model.state_dict())
    plain = get_recipe("thz_mtl")(r.params, DataInfo(identities=INFO.identities, twin_pairs=((0, 1), (2, 3)),
                                                     label_schemas={}, modalities=())).build_model()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():   # negatives of anchors 0 and 2 are their co-twins 1 and 3: weighted harder
        assert weighted(batch)["terms"]["supcon"].item() > plain(batch)["terms"]["supcon"].item()
    model.eval()
    with torch.no_grad():
        ev = model({k: v for k, v in batch.items() if not k.startswith(("pos_", "neg_"))})
    assert set(ev["quality"]) == {"ssim", "psnr"} and ev["quality"]["ssim"].shape == (3,)


def test_distill_model_terms_and_where_the_teacher_runs():
    r = _recipe("thz_distill", teacher_embedding_dim=12)
    model = r.build_model().train()
    assert isinstance(model.feature_proj, torch.nn.Linear)               # widths differ: a projection
    t_rows = _rows_seen(model.teacher.thz_encoder)
    batch = _triplet_batch(r)
    out = model(batch)
    assert t_rows == [9]
    assert {"supcon", "teacher_supcon", "teacher_reconstruction", "distill_feature", "distill_logit"} <= set(out["terms"])
    out["loss"].backward()
    assert float(model.teacher.vis_encoder.stem[0].weight.grad.abs().sum()) > 0
    anchors_only = _recipe("thz_distill", distill_full_triplet=False).build_model().train()
    t2 = _rows_seen(anchors_only.teacher.thz_encoder)
    anchors_only(batch)
    assert t2 == [3]
    assert isinstance(anchors_only.feature_proj, torch.nn.Identity)
    # evaluation: the student alone, no visible image needed
    model.eval()
    with torch.no_grad():
        ev = model({k: v for k, v in batch.items() if not k.startswith(("pos_", "neg_")) and k != "vis"})
    assert ev["embedding"].shape == (3, 16) and "distill_feature" not in ev["terms"]


def test_distilling_the_teachers_thz_branch_compares_pooled_thz_features_only():
    from models.losses import feature_distill_loss, relation_distill_loss, similarity_kd_loss

    r = _recipe("thz_distill", distill_source="thz_branch", teacher_embedding_dim=12, teacher_reconstruct=False,
                feature_weight=0.0, logit_weight=0.0, relation_weight=0.5, similarity_weight=2.0)
    model = r.build_model().train()
    assert isinstance(model.feature_proj, torch.nn.Identity)     # same encoder: no projection to learn
    seen = {}

    def pooled(key):
        def hook(module, inputs, out):
            seen[key] = out[-1].mean((2, 3))          # returns None: the output itself is unchanged
        return hook

    model.student.net.encoder.register_forward_hook(pooled("s"))
    model.teacher.thz_encoder.register_forward_hook(pooled("t"))
    model.teacher.vis_encoder.register_forward_hook(pooled("v"))
    out = model(_triplet_batch(r))
    terms = out["terms"]
    s_vec, t_vec = seen["s"], seen["t"]
    # the terms compare the student's pooled encoder features with the teacher's THz encoder's, never
    # with anything the visible encoder made; the same function on the same tensors: the same value
    assert terms["distill_relation"].item() == relation_distill_loss(s_vec, t_vec).item()
    assert terms["distill_similarity"].item() == similarity_kd_loss(s_vec, t_vec, 0.1).item()
    assert terms["distill_feature"].item() == feature_distill_loss(s_vec, t_vec).item()
    assert terms["distill_similarity"].item() != similarity_kd_loss(s_vec, seen["v"], 0.1).item()
    parts = [terms[k] for k in ("supcon", "posture", "reconstruction", "teacher_supcon", "teacher_posture")]
    parts += [0.5 * terms["distill_relation"], 2.0 * terms["distill_similarity"]]   # feature / logit weighted 0
    # 7 non-negative float32 terms summed in another order (and 2 products): sum_atol of their sum
    total = sum(x.item() for x in parts)
    assert out["loss"].item() == pytest.approx(total, rel=0, abs=sum_atol(7, total) + 2 * ops_rtol(1) * total)
    # teacher_reconstruct=false: no teacher reconstruction loss, its decoder untrained (no gradient
    # at all, so DDP needs no unused-parameter search)
    assert "teacher_reconstruction" not in terms
    out["loss"].backward()
    assert all(q.grad is None and not q.requires_grad for q in model.teacher.decoder.parameters())
    # every parameter still trained gets a gradient (what DDP without find_unused_parameters needs)
    assert all(q.grad is not None for q in model.parameters() if q.requires_grad)
    assert float(model.teacher.thz_encoder.stem[0].weight.grad.abs().sum()) > 0


def test_frozen_teacher_comes_from_a_file_and_does_not_move(tmp_path):
    from models.backbones import WeightsError

    trained = _recipe("thz_distill").build_model()
    f = tmp_path / "model.pt"
    torch.save({"model": trained.state_dict()}, f)
    r = _recipe("thz_distill", freeze_teacher=True, teacher_weights=str(f))
    model = r.build_model().train()
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(before["teacher." + k], v) for k, v in trained.teacher.state_dict().items())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    seen = {}

    def keep(key):
        def hook(module, inputs, output):
            seen[key] = output["posture_logits"]     # returns None: the output itself is unchanged
        return hook

    hooks = [net.register_forward_hook(keep(key)) for key, net in (("student", model.student.net),
                                                                    ("teacher", model.teacher))]
    out = model(_triplet_batch(r))
    for h in hooks:
        h.remove()
    assert "teacher_supcon" not in out["terms"]
    # distill_logit is T^2 KL(softmax(teacher / T) || softmax(student / T)) over the teacher's rows
    T = r.params.kd_temperature
    t = seen["teacher"].detach().double() / T
    st = seen["student"][:t.shape[0]].detach().double() / T
    diff = t.log_softmax(1) - st.log_softmax(1)
    kl = float((t.softmax(1) * diff).sum(1).mean()) * T * T
    C = t.shape[1]
    # each log-softmax within logsumexp_atol, the weighted sum of C differences within gamma(2C)
    zmax = float(max(t.abs().max(), st.abs().max()))
    tol = T * T * (2 * logsumexp_atol(C, zmax) + gamma(2 * C) * float(diff.abs().max()))
    assert out["terms"]["distill_logit"].item() == pytest.approx(kl, rel=0, abs=tol) and kl > 1e3 * tol
    out["loss"].backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("teacher."))   # BN stats too
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("student."))
    untaught = _recipe("thz_distill", freeze_teacher=True)  # refused before a fresh run starts (preflight)
    with pytest.raises(ValueError, match="teacher_weights"):
        type(untaught).check_start_files(untaught.params)
    torch.save({"model": trained.student.state_dict()}, tmp_path / "student_only.pt")
    with pytest.raises(WeightsError, match="no teacher"):
        _recipe("thz_distill", freeze_teacher=True, teacher_weights=str(tmp_path / "student_only.pt")).build_model()


def test_the_export_is_the_student_alone_as_a_thz_mtl_model_that_verifies_thz_pairs(tmp_path):
    from dist_train.checkpoint import atomic_save
    from dist_train.config import resolved_config_dict
    from dist_train.export import for_inference
    from dist_train.inference import InferenceEngine

    cfg = load_config(DISTILL_CONFIG, thz_overrides(tmp_path, recipe__params__fusion_dim=8,
                                                    recipe__params__fusion_heads=2))
    r = get_recipe("thz_distill")(recipe_params(cfg), INFO)
    model = r.build_model().eval()
    # what the trainer's export does at the end of training (dist_train.export.export_live)
    payload = for_inference(model.state_dict(), resolved_config_dict(cfg), INFO.to_dict())
    assert payload["config"]["recipe"]["name"] == "thz_mtl" and not any("teacher" in k for k in payload["model"])
    assert payload["model"].keys() == model.student.state_dict().keys()
    assert payload["config"]["recipe"]["params"]["embedding_dim"] == 16
    assert "kd_temperature" not in payload["config"]["recipe"]["params"]
    atomic_save({**payload, "threshold": 0.42}, tmp_path / "model.pt")
    engine = InferenceEngine.from_checkpoint(tmp_path / "model.pt", "cpu")
    assert engine.recipe_name == "thz_mtl" and engine.threshold == 0.42
    files = []
    for i, k in ((0, 0), (0, 1), (3, 0)):
        files.append(tmp_path / f"thz_{i}_{k}.png")
        Image.fromarray(render_sample(SPEC, i, k)["thz_dense"]).save(files[-1])
    res = engine.batch_verify([(files[0], files[1]), (files[0], files[2])])
    images = torch.stack([r.transform({"png": Image.open(f), "json": {}}, False)["image"] for f in files])
    with torch.no_grad():
        raw = model.embed(images)
    e = torch.nn.functional.normalize(raw, dim=1)
    # the engine may batch the images otherwise (other conv kernels): each embedding within the
    # encoder + heads bound (its global mean pool over the last 4x4 map added), the cosines after it
    tol = embedding_cosine_atol(2 * module_atol(_Embed(model), images, extra_reductions=(4 * 4,)), raw.shape[1],
                                float(raw.norm(dim=1).amin()))
    assert res[0]["score"] == pytest.approx(float(e[0] @ e[1]), rel=0, abs=tol)
    assert res[1]["score"] == pytest.approx(float(e[0] @ e[2]), rel=0, abs=tol)


def test_distillation_refuses_data_without_visible_images(tmp_path):
    from recipes.base import RecipeDataError

    info = DataInfo(identities=("a", "b"), twin_pairs=(), label_schemas={},
                    modalities=("json", "thz.png", "thz_target.png"))
    with pytest.raises(RecipeDataError, match="needs vis.<ext> images"):
        _recipe_with("thz_distill", info)
    assert _recipe_with("thz_mtl", info).name == "thz_mtl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([PYTHON, "dist_train/main.py", "--config", str(DISTILL_CONFIG),
                           *thz_overrides(tmp_path, recipe__params__fusion_dim=8, recipe__params__fusion_heads=2,
                                          data__synthetic__modalities="[thz_dense]")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "needs vis.<ext> images" in lines[0], proc.stderr[-2000:]
    with pytest.raises(RecipeDataError, match="vis_target"):
        _recipe_with("thz_distill", DataInfo(identities=("a",), twin_pairs=(), label_schemas={},
                                             modalities=("json", "thz.png", "vis.png")), teacher_visible="vis_target")


def _recipe_with(name: str, info: DataInfo, **params):
    cls = get_recipe(name)
    base = {k: v for k, v in TINY.items() if k in {f.name for f in dataclasses.fields(cls.Params)}}
    return cls(build_dataclass(cls.Params, {**base, **params}), info)


def test_validation_pictures_show_input_reconstruction_target():
    r = _recipe("thz_mtl", report_grid=2)
    model = r.build_model().eval()
    batch = default_collate([r.transform(_sample(i, 0), False) for i in range(3)])
    with torch.no_grad():
        pics = r.validation_images(model(batch), batch)
    (grid,) = pics.values()
    assert grid.shape == (3, 2 * 32 + 3 * 2, 3 * 32 + 4 * 2)         # 2 rows x 3 tiles, padding 2
    assert float(grid.min()) >= 0 and float(grid.max()) <= 1
    assert torch.equal(grid[0, 2:34, 2:34], batch["image"][0, 0])    # top-left: the first input, copied


def _csv_row_of(x: torch.Tensor) -> tuple[str, int, str]:
    """(identity, posture 1-5, sample) of a make_thz image from its grey level (centre pixel)."""
    from tests.shards.test_sources import IDENTS

    if x.dtype == torch.uint8:  # training images leave the workers as 8-bit pixels
        x = x.float() / 255
    v = round(float(x.flatten(-2)[..., x.shape[-1] * (x.shape[-2] // 2) + x.shape[-1] // 2].mean()) * 255)
    ident, rest = divmod(v, 50)
    unconcealed = rest % 8 > 2
    posture, sample = divmod(rest - 3 * unconcealed, 8)
    return IDENTS[ident], posture, f"{sample:02d}", unconcealed


@pytest.mark.parametrize("batching", ["triplet", "stream"])
def test_a_batchs_triplets_are_exactly_the_csv_rows(tmp_path, batching):
    """Real-format data (triplet CSVs packed by ``biomtl shards create --format thz``)
    into both models: each training row's anchor, positive and negative are one CSV
    row's three images (never re-drawn), with the row's identities and postures."""
    from shards import batching as batchers
    from shards.build import create
    from shards.manifest import Manifest
    from shards.stream import build_train_loader
    from tests.shards.test_sources import make_thz

    create("thz", make_thz(tmp_path / "raw"), tmp_path / "shards", split_by="sample", splits="train=1")
    info = Manifest.load(tmp_path / "shards").data_info()
    for name in ("thz_mtl", "thz_distill"):
        cls = get_recipe(name)
        params = {k: v for k, v in TINY.items() if k in {f.name for f in dataclasses.fields(cls.Params)}}
        recipe = cls(build_dataclass(cls.Params, {**params, "augment": "none"}), info)
        if batching == "triplet":
            loader = batchers.build_triplet_loader(tmp_path / "shards", "train", recipe.transform, 8, rank=0,
                                                   world_size=1, num_workers=0, seed=0, epoch=0)
        else:
            loader = build_train_loader(tmp_path / "shards", "train", recipe.transform, 8, rank=0, world_size=1,
                                        num_workers=0, seed=0, epoch=0)
        batch = next(iter(loader))
        assert batch["image"].shape == (8, 1, 32, 32) and batch["pos_image"].shape == (8, 1, 32, 32)
        for i in range(8):
            ident, posture, sample, unconcealed = _csv_row_of(batch["image"][i])
            assert not unconcealed and batch["__key__"][i].startswith(f"{ident}_b{posture}b_{sample}")
            nxt = IDENTS_NEXT[ident]   # make_thz's row: (p_i b, p_i n, p_{i+1} n), same posture and sample
            assert _csv_row_of(batch["pos_image"][i]) == (ident, posture, sample, True)
            assert _csv_row_of(batch["neg_image"][i]) == (nxt, posture, sample, True)
            assert torch.equal(batch["pos_image"][i], batch["target"][i])
            assert batch["identity"][i] == batch["pos_identity"][i] == info.identities.index(ident)
            assert batch["neg_identity"][i] == info.identities.index(nxt)
            assert batch["pos_posture"][i] == batch["posture"][i] == batch["neg_posture"][i] == posture - 1
            if name == "thz_distill":  # the teacher sees each role's own visible image
                assert batch["neg_vis"].shape == batch["pos_vis"].shape == (8, 3, 32, 32)
        out = recipe.build_model().train()(batch)
        assert torch.isfinite(out["loss"]) and out["terms"]["supcon"].item() > 0
        assert ("distill_feature" in out["terms"]) == (name == "thz_distill")
        # anchors -> their unconcealed positive: the reconstruction term is there, on the 8 anchors
        assert "reconstruction" in out["terms"] and out["reconstruction"].shape == (8, 1, 32, 32)


IDENTS_NEXT = {"p1": "p2", "p2": "p3", "p3": "p4", "p4": "p1"}


def test_distill_refuses_csv_triplets_without_the_negatives_visible_image():
    from recipes.base import RecipeDataError

    info = DataInfo(identities=("p1", "p2"), twin_pairs=(), label_schemas={},
                    modalities=("json", "thz.png", "thz_negative.png", "thz_target.png", "vis.png", "vis_target.png"))
    cls = get_recipe("thz_distill")
    params = build_dataclass(cls.Params, {k: v for k, v in TINY.items()})
    with pytest.raises(RecipeDataError, match="lack vis_negative"):
        cls(params, info)
    cls(params, dataclasses.replace(info, modalities=info.modalities + ("vis_negative.png",)))


# ----------------------------------------------------------------------------- metrics and report helpers

def test_metrics_gather_quality_posture_and_verification():
    from recipes.thz import ThzMetrics

    def state(ssim, conc, post, pred, ident):
        m = ThzMetrics()
        n = len(ssim)
        out = {"embedding": torch.eye(4)[torch.tensor(ident)] + 0.01, "posture_logits": torch.eye(5)[torch.tensor(pred)],
               "quality": {"ssim": torch.tensor(ssim), "psnr": torch.full((n,), 20.0)}}
        m.update(out, {"posture": torch.tensor(post), "concealed": torch.tensor(conc), "identity": torch.tensor(ident),
                       "_valid": torch.ones(n, dtype=torch.bool)})
        return m.state()

    s1 = state([0.5, 0.7], [1, 0], [0, 1], [0, 2], [0, 1])
    s2 = state([0.9, 0.1], [1, 1], [3, -1], [3, 3], [0, 1])
    got = ThzMetrics.compute([s1, s2])
    # means of float32-rounded decimals (4: three roundings, a sum of 4, a division; 3: two, two, one);
    # psnr and the counts are exact
    assert got["ssim"] == pytest.approx(0.55, rel=ops_rtol(3 + 3 + 1), abs=0)
    assert got["ssim_concealed"] == pytest.approx(0.5, rel=ops_rtol(2 + 2 + 1), abs=0)
    assert got["posture_acc"] == pytest.approx(2 / 3) and got["psnr"] == pytest.approx(20.0)
    assert got["eer"] == pytest.approx(0.0) and got["auc"] == pytest.approx(1.0)   # identities are one-hot apart


def test_pair_partners_follow_keys_and_prefer_the_co_twin():
    from recipes.thz_report import pair_partners

    keys = ["a2", "a1", "b1", "c1", "c2", "d1"]
    identity = np.array([0, 0, 1, 2, 2, 3])
    twin = np.array([2, 2, -1, 0, 0, -1])
    pos, neg = pair_partners(keys, identity, twin)
    assert pos.tolist() == [1, 0, -1, 4, 3, -1]
    # identity 0 -> its co-twin 2 (same position: a1->c1, a2->c2); 1 -> next identity 2; 3 -> wraps to 0
    assert neg.tolist() == [4, 3, 3, 1, 0, 1]


# ----------------------------------------------------------------------------- training runs

def _run_torchrun(tmp_path: Path, config: Path, name: str, **extra) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / name
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dist_train/main.py",
           "--config", str(config), *thz_overrides(out, **extra)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = list((out / "runs").iterdir())
    return run


@pytest.mark.integration
def test_both_recipes_train_under_two_process_torchrun_and_the_student_verifies_thz_pairs(tmp_path):
    from dist_train.commands import eval_cmd
    from dist_train.inference import InferenceEngine
    from shards.manifest import Manifest

    mtl = _run_torchrun(tmp_path, MTL_CONFIG, "mtl")
    distill = _run_torchrun(tmp_path, DISTILL_CONFIG, "distill", recipe__params__fusion_dim=8,
                            recipe__params__fusion_heads=2)
    data = next((tmp_path / "synthetic-cache-thz").glob("synthetic-*"))
    n_test = Manifest.load(data).split_size("test")
    for run in (mtl, distill):
        final = json.loads((run / "final_metrics.json").read_text())
        assert 0.0 <= final["ssim"] <= 1.0 and 0.0 <= final["test_posture_acc"] <= 1.0
        rows = (run / "eval" / "test" / "per_sample.csv").read_text().splitlines()
        keys = [line.split(",")[0] for line in rows[1:]]
        assert len(keys) == len(set(keys)) == n_test                # each test sample once over the two ranks
        for name in ("per_identity.csv", "per_posture.csv", "reconstructions.png", "posture_confusion.png",
                     "roc.png", "metrics.json"):
            assert (run / "eval" / "test" / name).is_file(), name
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0}).Reload()
        assert [e.step for e in events.Images("val/concealed_reconstruction_target")] == [2]
    student = torch.load(distill / "model.pt", weights_only=True)            # the student alone
    assert student["config"]["recipe"]["name"] == "thz_mtl" and not any("teacher" in k for k in student["model"])
    checkpoint = torch.load(distill / "checkpoints" / "latest.pt", weights_only=True)
    assert any(k.startswith("teacher.") for k in checkpoint["model"])      # resuming keeps the teacher
    engine = InferenceEngine.from_checkpoint(distill / "model.pt", "cpu")
    files = []
    for i, k in ((0, 0), (0, 1), (5, 0)):
        files.append(tmp_path / f"thz_{i}_{k}.png")
        Image.fromarray(render_sample(SPEC, i, k)["thz_dense"]).save(files[-1])   # THz only: no visible image
    res = engine.batch_verify([(files[0], files[1]), (files[0], files[2])])
    assert all(-1.0 <= x["score"] <= 1.0 and isinstance(x["match"], bool) for x in res)
    assert engine.threshold_source.startswith("validation")                 # the run's own val threshold
    whole = InferenceEngine.from_checkpoint(distill / "checkpoints" / "latest.pt", "cpu")   # teacher + student
    assert whole.recipe_name == "thz_distill" and whole.extract_features(files).shape == (3, 16)
    assert eval_cmd.run(["--checkpoint", str(distill / "model.pt"), "--output", str(tmp_path / "ev"),
                         "--no-progress", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert report["samples"] == n_test and 0.0 <= report["reconstruction"]["ssim"] <= 1.0
    assert (tmp_path / "ev" / "per_posture.csv").is_file() and (tmp_path / "ev" / "reconstructions.png").is_file()


def _untrained_test_metrics(cfg) -> dict[str, float]:
    """The test metrics of the model the trainer starts from (same seed, same init)."""
    from dist_train.main import prepare_data, seed_everything
    from shards.manifest import Manifest
    from shards.stream import build_eval_loader

    class _Ctx:  # prepare_data needs only the local-main flag (one process here)
        class env:
            is_local_main = True

    data = prepare_data(cfg, _Ctx())
    recipe = get_recipe(cfg.recipe.name)(recipe_params(cfg), Manifest.load(data).data_info())
    seed_everything(cfg.experiment.seed)
    model = recipe.build_model().eval()
    metrics = recipe.new_metrics()
    with torch.no_grad():
        for batch in build_eval_loader(data, cfg.data.test_split, recipe.transform, 16, 0, 1, 0):
            metrics.update(model(batch), batch)
    return type(metrics).compute([metrics.state()])


@pytest.mark.integration
@pytest.mark.parametrize("config", [MTL_CONFIG, DISTILL_CONFIG], ids=["thz_mtl", "thz_distill"])
def test_a_short_run_clearly_beats_the_untrained_model(tmp_path, config):
    from dist_train.main import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # on a shared 2-core box, one thread is many times faster than two
    try:
        extra = {"recipe__params__fusion_dim": 32} if config == DISTILL_CONFIG else {}
        cfg = load_config(config, thz_overrides(
            tmp_path, data__synthetic__num_identities=24, data__synthetic__samples_per_identity=10,
            data__batch_size=8, recipe__params__width=8, recipe__params__depth=3, recipe__params__embedding_dim=128,
            train__max_steps=90, train__val_every_steps=45, train__log_every_steps=15, **extra))
        before = _untrained_test_metrics(cfg)
        after = train(cfg, None)
    finally:
        torch.set_num_threads(threads)
    # measured (seed 42, test split): SSIM 0.27 -> 0.90, posture accuracy 0.20 -> 1.00 (thz_mtl) / 0.97
    # (thz_distill's student) in 90 steps, about 35 / 65 s on one core
    assert after["test_ssim"] >= before["ssim"] + 0.4, (before, after)
    assert after["test_posture_acc"] >= before["posture_acc"] + 0.4, (before, after)


@pytest.mark.parametrize("name", ["thz_mtl", "thz_distill"])
def test_training_images_are_8_bit_and_reach_the_network_as_the_evaluation_floats(name):
    """The workers hand over uint8 images (THz input, target, the distillation's
    visible image); unaugmented, they are exactly the evaluation floats once the
    model divides by 255, so the training forward is the same computation on 8-bit
    and on float batches."""
    r = _recipe(name, augment="none")
    train, floats = r.transform(_sample(0, 0), True), r.transform(_sample(0, 0), False)
    images = [k for k, v in train.items() if v.dim() == 3]
    assert "image" in images and all(train[k].dtype == torch.uint8 for k in images)
    assert all(torch.equal(train[k].float() / 255, floats[k]) for k in images if k in floats)
    batch8 = _triplet_batch(r, train=True)
    batchf = {k: v.float() / 255 if v.dtype == torch.uint8 else v for k, v in batch8.items()}
    model = r.build_model().train()
    torch.manual_seed(0)
    a = model(batch8)
    torch.manual_seed(0)
    b = model(batchf)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["embedding"], b["embedding"])
