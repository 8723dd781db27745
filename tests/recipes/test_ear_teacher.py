"""ear_teacher (issue 14): crop, collage, pseudo-labels, pretrained weights, and a
2-process torchrun run with extraction."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recipes.ear_teacher import (EarTeacherModel, EarTeacherParams, EarTeacherRecipe, assign_pseudo_labels, collage,
                                 ear_crop, key_hash)
from shards.manifest import DataInfo
from tests.conftest import PYTHON, REPO
from tests.tolerance import ops_rtol

CONFIG = REPO / "configs" / "ear_teacher.yaml"
NO_DATA = DataInfo(identities=[], twin_pairs=[], label_schemas={}, modalities=[])
TINY = dict(backbone="convnext_atto", dims=[8, 16, 32, 64], depths=[1, 1, 1, 1], img_size=32, projection_dim=16,
            projection_hidden=32, predictor_hidden=8, decoder_width=16, num_pseudo_classes=4)


def tiny_params(**kw) -> EarTeacherParams:
    return EarTeacherParams(**{**TINY, **kw})


def _sample(size=(100, 60), **meta):
    arr = np.arange(size[0] * size[1] * 3, dtype=np.uint32).reshape(size[1], size[0], 3) % 251
    return {"image.jpg": Image.fromarray(arr.astype(np.uint8)), "json": meta, "__key__": "k"}


# ----------------------------------------------------------------------------- crop

def test_crop_grows_the_box_by_the_buffer_and_clips_it_to_the_image():
    inside = ear_crop(_sample(bbox_raw=[20, 10, 70, 50]), 0.1)        # 50 x 40 box, +5 / +4 per side
    assert inside.size == (60, 48)
    assert np.array_equal(np.asarray(inside), np.asarray(_sample()["image.jpg"].crop((15, 6, 75, 54))))
    corner = ear_crop(_sample(bbox_raw=[2, 1, 42, 31]), 0.1)          # would start at (-2, -2): clipped at 0
    assert corner.size == (46, 34)
    assert np.array_equal(np.asarray(corner), np.asarray(_sample()["image.jpg"].crop((0, 0, 46, 34))))
    edge = ear_crop(_sample(bbox_raw=[60, 20, 100, 60]), 0.25)        # right / bottom borders
    assert edge.size == (50, 50)                                      # 50..100 x 10..60
    whole = ear_crop({"png": _sample()["image.jpg"], "json": {}}, 0.1)  # no box: the whole image
    assert whole.size == (100, 60)


def test_synthetic_ear_sample_crops_to_its_box():
    from shards.synthetic import SyntheticSpec, _sample_fields, render_sample

    spec = SyntheticSpec(num_identities=3, samples_per_identity=2, image_size=48, modalities=("ear",))
    fields = _sample_fields(spec, render_sample(spec, 1, 0))
    x1, y1, x2, y2 = fields["json"]["ear_bbox"]
    assert 0 <= x1 < x2 <= 48 and 0 <= y1 < y2 <= 48 and (x2 - x1) * (y2 - y1) < 0.6 * 48 * 48
    sample = {"ear.png": Image.fromarray(fields["ear.png"]), "json": fields["json"], "__key__": "s"}
    crop = ear_crop(sample, 0.0)
    assert crop.size == (int(x2 - x1), int(y2 - y1))
    vis_only = _sample_fields(SyntheticSpec(num_identities=3, samples_per_identity=2, image_size=48,
                                            modalities=("vis",)), render_sample(spec, 1, 0))
    assert "ear_bbox" not in vis_only["json"]                         # other modalities' samples are unchanged
    assert {k: v for k, v in fields["json"].items() if k != "ear_bbox"} == vis_only["json"]
    out = EarTeacherRecipe(tiny_params(), NO_DATA).transform(sample, train=True)
    assert out["image"].shape == out["view2"].shape == (3, 32, 32) and int(out["identity"]) == 1


# ----------------------------------------------------------------------------- collage

def test_collage_has_originals_on_top_and_reconstructions_below(tmp_path):
    from torchvision.utils import save_image

    n, s, pad = 5, 16, 2
    originals = torch.zeros(n, 3, s, s)
    originals[:, 0] = 1.0                                             # red tiles
    recon = torch.zeros(n, 3, s, s)
    recon[:, 2] = 1.0                                                 # blue tiles
    grid = collage(originals, recon, padding=pad)
    save_image(grid, tmp_path / "c.png")
    img = np.asarray(Image.open(tmp_path / "c.png").convert("RGB"))
    height, tiles = 2 * (s + pad) + pad, n * (s + pad) + pad
    label = img.shape[1] - tiles                                      # the strip naming the rows, on the left
    assert img.shape[0] == height and label > 20
    for col in range(n):
        x = label + pad + col * (s + pad) + s // 2
        assert tuple(img[pad + s // 2, x]) == (255, 0, 0)              # top row: originals
        assert tuple(img[2 * pad + s + s // 2, x]) == (0, 0, 255)      # bottom row: reconstructions
    assert tuple(img[0, label]) == (255, 255, 255)                    # white padding
    strip = img[:, :label].min(axis=2)
    assert strip[: height // 2].min() < 128 and strip[height // 2:].min() < 128   # a label on each row


def test_collage_names_its_rows():
    """The labels are the row names, drawn where their row is (the strip's ink differs per row)."""
    from recipes.ear_teacher import ROW_LABELS

    assert ROW_LABELS == ("input", "reconstruction")
    grid = collage(torch.zeros(3, 3, 24, 24), torch.zeros(3, 3, 24, 24), padding=2)
    label = grid.shape[2] - (3 * 26 + 2)
    ink = (grid[0, :, :label] < 0.5).sum(dim=0)                      # dark pixels per column of the strip
    top = (grid[0, :grid.shape[1] // 2, :label] < 0.5).any(dim=0).nonzero().max()
    bottom = (grid[0, grid.shape[1] // 2:, :label] < 0.5).any(dim=0).nonzero().max()
    assert ink.sum() > 0 and bottom > top + 10                        # "reconstruction" is wider than "input"


# ----------------------------------------------------------------------------- pseudo-labels

def _clustered(seed: int, n_ids: int = 6, per: int = 8, dim: int = 16):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    ident = np.repeat(np.arange(n_ids), per)
    emb = centres[ident] + 0.1 * rng.normal(size=(len(ident), dim))
    keys = np.array([key_hash(f"s{i}") for i in range(len(ident))])
    return keys, emb, ident


def test_pseudo_labels_are_deterministic_carry_information_and_follow_the_embedding():
    from sklearn.metrics import normalized_mutual_info_score as nmi

    keys, emb, ident = _clustered(0)
    k1, l1, c1 = assign_pseudo_labels(keys, emb, 6, seed=3, n_init=1)
    perm = np.random.default_rng(1).permutation(len(keys))            # another row order: same labels per key
    k2, l2, _ = assign_pseudo_labels(keys[perm], emb[perm], 6, seed=3, n_init=1)
    assert np.array_equal(k1, k2) and np.array_equal(l1, l2) and c1.shape == (6, 16)
    by_key = dict(zip(keys, ident))
    assert nmi([by_key[k] for k in k1], l1) > 0.95                    # clusters of a structured embedding = identities
    shuffled = emb[np.random.default_rng(2).permutation(len(emb))]    # the embedding changes: so do the labels
    _, l3, _ = assign_pseudo_labels(keys, shuffled, 6, seed=3, n_init=1)
    assert nmi(l1, l3) < 0.6
    _, l4, _ = assign_pseudo_labels(keys, emb, 50, seed=3, n_init=1)  # k capped at the number of samples
    assert len(np.unique(l4)) <= len(keys)


def test_model_keeps_the_label_table_in_its_state_dict_and_looks_rows_up():
    m = EarTeacherModel(tiny_params())
    m.set_pseudo_labels(np.array([30, 10, 20]), np.array([2, 0, 1]))
    assert m.pseudo_labels(torch.tensor([20, 99, 10, 30])).tolist() == [1, -1, 0, 2]
    fresh = EarTeacherModel(tiny_params())
    fresh.load_state_dict(m.state_dict())
    assert fresh.pseudo_labels(torch.tensor([10, 20, 30])).tolist() == [0, 1, 2]
    batch = {"image": torch.rand(4, 3, 32, 32), "view2": torch.rand(4, 3, 32, 32),
             "key_hash": torch.tensor([10, 20, 30, 99])}
    out = m(batch)
    assert set(out["terms"]) == {"reconstruction", "simsiam", "metric"} and out["embedding"].shape == (4, 16)
    out["loss"].backward()
    assert m.head.weight.grad.abs().sum() > 0                         # the pseudo-labelled rows train the head


def test_on_epoch_start_assigns_labels_from_an_embedding_pass_and_reinitialises_the_head(tmp_path):
    from tests.conftest import artifact_context

    recipe = EarTeacherRecipe(tiny_params(pseudo_label_every=2), NO_DATA)
    model = recipe.build_model().eval()
    torch.manual_seed(0)
    images = torch.rand(12, 3, 32, 32)
    batches = [{"image": images[i:i + 4], "key_hash": torch.arange(i, i + 4) * 7 + 1,
                "identity": torch.arange(i, i + 4) % 3, "_valid": torch.tensor([True, True, True, i < 8])}
               for i in (0, 4, 8)]
    ctx = artifact_context(tmp_path, {"train": batches})
    recipe.on_epoch_start(model, 1, ctx)                              # not a reassignment epoch
    assert model.table_keys.numel() == 0
    before = model.head.weight.detach().clone()
    recipe.on_epoch_start(model, 2, ctx)
    assert model.table_keys.numel() == 11                              # the padding row is left out
    assert not torch.equal(before, model.head.weight)
    labels = model.pseudo_labels(torch.arange(12) * 7 + 1)
    assert labels[:11].ge(0).all() and labels[11] == -1
    again = recipe.build_model().eval()
    again.load_state_dict(model.state_dict(), strict=False)
    again.set_extra_state(torch.zeros(2, 0, dtype=torch.long))
    recipe.on_epoch_start(again, 2, ctx)                              # same weights + seed: same labels
    assert torch.equal(again.pseudo_labels(torch.arange(12) * 7 + 1), labels)


def test_feature_type_picks_the_backbone_features_or_the_projection(tmp_path):
    """The original exports the backbone's pooled features (768-d for ConvNeXt-Tiny); the
    pseudo-labels are always made from the projection, whatever ``feature_type`` says."""
    from tests.conftest import artifact_context

    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32)
    proj = EarTeacherRecipe(tiny_params(), NO_DATA)
    feat = EarTeacherRecipe(tiny_params(feature_type="features"), NO_DATA)
    a, b = proj.build_model().eval(), feat.build_model().eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        pooled = a.net(images, reconstruct=False)["features"]
        assert a.embed(images).shape == (4, 16) and torch.equal(b.embed(images), pooled) and pooled.shape == (4, 64)
        assert torch.equal(b.projection(images), a.embed(images))
        assert torch.equal(feat.embed_as(b, images, "projection"), a.embed(images))
        assert torch.equal(proj.embed_as(a, images, "features"), pooled)
    assert proj.feature_types() == ("projection", "features") and feat.feature_types() == ("features", "projection")
    batches = [{"image": images, "key_hash": torch.arange(4) + 1}]
    feat.on_epoch_start(b, 0, artifact_context(tmp_path, {"train": batches}))
    assert b.table_keys.numel() == 4 and b.head.weight.shape[1] == 16   # labels and head on the projection
    from dist_train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="feature_type"):
        load_config(CONFIG, ["recipe.params.feature_type=pooled"])


def test_the_default_config_is_the_setting_that_learns_on_ami_and_seed_is_the_originals():
    from dist_train.config import load_config, recipe_params

    p = recipe_params(load_config(CONFIG, []))
    assert (p.pseudo_labels, p.metric_loss, p.scale, p.margin, p.reconstruction_weight) == \
        ("instance", "arcface", 10.0, 0.0, 0.1)
    assert p.rotation > 0 and p.brightness > 0 and p.feature_type == "projection"
    seed = recipe_params(load_config(REPO / "configs" / "ear_teacher" / "seed.yaml", []))
    assert (seed.pseudo_labels, seed.num_pseudo_classes, seed.metric_loss, seed.scale, seed.margin) == \
        ("kmeans", 512, "arcface", 64.0, 0.5)
    assert (seed.reconstruction_weight, seed.metric_weight, seed.simsiam_weight) == (1.0, 0.1, 0.0)
    assert (seed.backbone, seed.img_size, seed.collage_samples, seed.feature_type) == \
        ("convnext_tiny", 224, 10, "features")
    augmentations = ("rotation", "zoom", "shift", "brightness", "contrast", "saturation", "hue", "grayscale",
                     "noise", "crop_jitter")
    assert not seed.flip and all(getattr(seed, a) == 0 for a in augmentations)


def test_instance_labels_give_every_sample_its_own_class_in_key_order():
    from recipes.ear_teacher import instance_labels

    keys = np.array([30, 10, 20])
    emb = np.array([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    k, labels, centroids = instance_labels(keys, emb, num_classes=3)
    assert k.tolist() == [10, 20, 30] and labels.tolist() == [0, 1, 2]
    # normalised, key order: a 2-d norm (2 squares, a sum, sqrt) and a division, in float32 at worst
    assert np.allclose(centroids, [[0, 1], [0.5 ** 0.5, 0.5 ** 0.5], [1, 0]], rtol=0, atol=ops_rtol(5))
    k2, labels2, _ = instance_labels(keys[::-1], emb[::-1], num_classes=3)                  # row order is irrelevant
    assert k2.tolist() == k.tolist() and labels2.tolist() == labels.tolist()
    with pytest.raises(ValueError, match="num_pseudo_classes"):
        instance_labels(keys, emb, num_classes=2)


def test_instance_mode_sizes_the_head_to_the_train_split_and_makes_it_a_memory_bank(tmp_path):
    from tests.conftest import artifact_context

    data = DataInfo(identities=[], twin_pairs=[], label_schemas={}, modalities=[], split_sizes={"train": 11})
    recipe = EarTeacherRecipe(tiny_params(pseudo_labels="instance", num_pseudo_classes=4), data)
    model = recipe.build_model().eval()
    assert model.head.weight.shape[0] == 11                           # one row per training image, not 4
    torch.manual_seed(0)
    images = torch.rand(12, 3, 32, 32)
    batches = [{"image": images[i:i + 4], "key_hash": torch.arange(i, i + 4) * 7 + 1,
                "identity": torch.arange(i, i + 4) % 3, "_valid": torch.tensor([True, True, True, i < 8])}
               for i in (0, 4, 8)]
    recipe.on_epoch_start(model, 0, artifact_context(tmp_path, {"train": batches}))
    labels = model.pseudo_labels(torch.arange(11) * 7 + 1)
    assert sorted(labels.tolist()) == list(range(11))                 # every image its own class
    with torch.no_grad():                                              # embedded in the same batches of 4
        z = torch.cat([torch.nn.functional.normalize(model.embed(b["image"]), dim=1) for b in batches])[:11]
    # the head = the current embeddings: the same raw embeddings, normalised by numpy there and by
    # torch here (each: d squares summed, sqrt, a division; components <= 1)
    assert torch.allclose(model.head.weight[labels], z, rtol=0, atol=2 * ops_rtol(z.shape[1] + 3))


def test_augmentations_are_off_by_default_and_each_one_changes_the_view():
    import random

    from recipes.ear_teacher import augment_view

    torch.manual_seed(0)
    random.seed(0)
    image = torch.rand(3, 32, 32) * 0.8 + 0.1
    assert torch.equal(augment_view(image, tiny_params()), image)
    for name, value in [("rotation", 10.0), ("zoom", 0.2), ("shift", 0.1), ("brightness", 0.3),
                        ("contrast", 0.3), ("saturation", 0.3), ("hue", 0.1), ("grayscale", 1.0), ("noise", 0.05)]:
        views = [augment_view(image, tiny_params(**{name: value})) for _ in range(4)]
        assert any(not torch.allclose(v, image, atol=1e-3) for v in views), name   # a draw can be ~identity
        assert all(v.shape == image.shape and 0 <= float(v.min()) and float(v.max()) <= 1 for v in views)
    with pytest.raises(ValueError):
        tiny_params(zoom=1.0)
    with pytest.raises(ValueError):
        tiny_params(hue=0.6)


# ----------------------------------------------------------------------------- weights

def test_local_pretrained_weights_load_and_a_missing_file_is_one_clear_error(tmp_path):
    from models.backbones import WeightsError

    donor = EarTeacherModel(tiny_params())
    torch.save(donor.net.encoder.state_dict(), tmp_path / "enc.pth")
    m = EarTeacherModel(tiny_params(weights_path=str(tmp_path / "enc.pth")))
    assert all(torch.equal(a, b) for a, b in zip(m.net.encoder.state_dict().values(),
                                                 donor.net.encoder.state_dict().values()))
    with pytest.raises(WeightsError, match="not found"):
        EarTeacherModel(tiny_params(weights_path=str(tmp_path / "missing.pth")))


def test_config_refuses_a_missing_weights_file(tmp_path):
    from dist_train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="nope.pth"):     # the trainer's one-line error (exit 2), before anything
        load_config(CONFIG, [f"recipe.params.weights_path={tmp_path / 'nope.pth'}"])


# ----------------------------------------------------------------------------- under the trainer

def ear_overrides(tmp_path: Path, **extra: object) -> list[str]:
    values = {
        "experiment.output_dir": str(tmp_path / "runs"),
        "data.synthetic.cache_dir": str(tmp_path.parent / "synthetic-cache-ear"),
        "data.synthetic.num_identities": 12,
        "data.synthetic.samples_per_identity": 4,
        "data.synthetic.image_size": 40,
        "data.batch_size": 4,
        "recipe.params.backbone": "convnext_atto",
        "recipe.params.dims": "[8,16,32,64]",
        "recipe.params.depths": "[1,1,1,1]",
        "recipe.params.img_size": 32,
        "recipe.params.projection_dim": 16,
        "recipe.params.projection_hidden": 32,
        "recipe.params.decoder_width": 16,
        "recipe.params.num_pseudo_classes": 8,
        "recipe.params.noise": 0.05,
        "train.precision": "fp32",
        "train.epochs": 2,
        "train.log_every_steps": 1,
        "checkpoint.every_epochs": 1,
        "logging.progress": "false",
        "logging.plot": "false",
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


@pytest.mark.integration
def test_trains_under_two_process_torchrun_and_extracts_n_by_d_features(tmp_path):
    from dist_train.commands import extract_cmd

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dist_train/main.py",
           "--config", str(CONFIG), *ear_overrides(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = list((tmp_path / "runs").iterdir())
    final = json.loads((run / "final_metrics.json").read_text())
    assert np.isfinite(final["loss"]) and np.isfinite(final["reconstruction_mse"])
    collages = sorted(p.name for p in (run / "reconstruction_collages").iterdir())
    assert collages == ["epoch_0001.png", "epoch_0002.png"]             # one per validation (every epoch)
    assert len(list((run / "checkpoints" / "periodic").iterdir())) == 2  # checkpoint.every_epochs=1
    assert (run / "checkpoints" / "best.pt").is_file() and len(list((run / "checkpoints" / "topk").iterdir())) == 2
    state = torch.load(run / "model.pt", weights_only=True)["model"]
    assert state["_extra_state"].shape[0] == 2 and state["_extra_state"].shape[1] > 0   # the pseudo-label table
    images = tmp_path / "imgs"
    for subject in ("a", "b"):
        (images / subject).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.random.default_rng(k).integers(0, 255, (50, 30, 3), dtype=np.uint8)).save(
                images / subject / f"{k}.png")
    assert extract_cmd.run(["--checkpoint", str(run / "model.pt"), "--images", str(images),
                            "--output", str(tmp_path / "f.npz"), "--device", "cpu", "--no-progress"]) == 0
    feats = np.load(tmp_path / "f.npz")["features"]
    # float32 unit vectors: normalising 16 values (16 squares summed, sqrt, divide) and the norm again
    assert feats.shape == (6, 16)
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=0, atol=ops_rtol(2 * (16 + 2)))
    assert extract_cmd.run(["--checkpoint", str(run / "model.pt"), "--images", str(images), "--feature-type",
                            "features", "--output", str(tmp_path / "g.npz"), "--device", "cpu", "--no-progress"]) == 0
    assert np.load(tmp_path / "g.npz")["features"].shape == (6, 64)      # the backbone's pooled features


def test_training_views_are_8_bit_and_reach_the_network_as_the_evaluation_floats():
    """The workers hand over uint8 views (a quarter of float32's bytes); without
    augmentation a view is the evaluation image rounded to 8 bits, and the model
    normalises it to the evaluation floats (the 8-bit path is PixelInput, then the same net)."""
    from models.pixels import IMAGENET_MEAN, IMAGENET_STD

    r = EarTeacherRecipe(tiny_params(), NO_DATA)
    sample = _sample(bbox_raw=[20, 10, 70, 50])
    train, floats = r.transform(sample, train=True), r.transform(sample, train=False)["image"]
    assert train["image"].dtype == train["view2"].dtype == torch.uint8 and floats.dtype == torch.float32
    model = r.build_model().eval()
    with torch.no_grad():
        # the crop is already 8-bit (x / 255, then * 255 and rounded: the same level), then two
        # orders of (x / 255 - mean) / std, as tests/models/test_pixels.py bounds them
        pixel_tol = 2 * ops_rtol(6) * (1 + max(IMAGENET_MEAN)) / min(IMAGENET_STD)
        assert torch.allclose(model.pixels(train["image"][None]), floats[None], rtol=0, atol=pixel_tol)
        assert torch.equal(model.embed(train["image"][None]), model.embed(model.pixels(train["image"][None])))
        batch8 = {"image": train["image"][None], "view2": train["view2"][None], "key_hash": train["key_hash"][None]}
        batchf = {**batch8, "image": model.pixels(batch8["image"]), "view2": model.pixels(batch8["view2"])}
        a, b = model(batch8), model(batchf)
        assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["reconstruction"], b["reconstruction"])


def test_collages_show_a_new_random_draw_of_validation_crops_each_epoch_and_leave_training_unchanged(tmp_path):
    """The original draws its collage crops at random at every epoch: the collages of two
    epochs show other crops (not the first validation batch twice), a rerun of the same
    seed draws the same ones, and training (weights) is the same with collages or without
    (collage_samples: 0): the draw takes no number from a global RNG."""
    from dist_train.config import load_config
    from dist_train.main import train

    def run(name, samples):
        cfg = load_config(CONFIG, ear_overrides(tmp_path, experiment__name=name, recipe__params__collage_samples=samples,
                                                data__synthetic__samples_per_identity=6, data__num_workers=0))
        train(cfg, None)
        return next((tmp_path / "runs").glob(f"{name}_*"))

    def top_row(png):   # the originals' tiles (top row; the labels strip and the reconstructions left out)
        grid = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
        return grid[: grid.shape[0] // 2]

    a, b, none = run("a", 3), run("b", 3), run("none", 0)
    assert not (none / "reconstruction_collages").exists()
    first, second = (top_row(a / "reconstruction_collages" / f"epoch_{e:04d}.png") for e in (1, 2))
    assert first.shape == second.shape and not np.array_equal(first, second)   # other crops at epoch 2
    for e in (1, 2):
        assert np.array_equal(top_row(a / "reconstruction_collages" / f"epoch_{e:04d}.png"),
                              top_row(b / "reconstruction_collages" / f"epoch_{e:04d}.png"))
    wa, wn = (torch.load(r / "model.pt", weights_only=True)["model"] for r in (a, none))
    assert wa.keys() == wn.keys() and all(torch.equal(wa[k], wn[k]) for k in wa)
