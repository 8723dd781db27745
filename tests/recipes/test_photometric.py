"""The photometric recipes (photometric_mtl, photometric_concat): configs, the
transform on synthetic albedo / normal / depth, each backbone learning a batch,
both recipes under the trainer, the refusal of data lacking a modality, and a
two-process torchrun run."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from dist_train.config import build_dataclass, load_config, recipe_params
from recipes.base import DataInfo, get_recipe
from recipes.photometric import ATTRIBUTE_ALIASES, MAP_CHANNELS
from shards.synthetic import LABEL_SCHEMAS, SyntheticSpec, _sample_fields, render_sample
from tests.conftest import PYTHON, REPO
from tests.tolerance import ops_rtol

MTL_CONFIG = REPO / "configs" / "photometric_mtl.yaml"
CONCAT_CONFIG = REPO / "configs" / "photometric_concat.yaml"
SPEC = SyntheticSpec(num_identities=4, image_size=32, modalities=("maps",))
MAP_MEMBERS = ("albedo.npy", "depth.npy", "json", "normal.npy")
INFO = DataInfo(identities=tuple(f"p{i}" for i in range(4)), twin_pairs=(),
                label_schemas={k: tuple(v) for k, v in LABEL_SCHEMAS.items()}, modalities=MAP_MEMBERS)
TINY = {"img_size": 32, "embedding_dim": 32, "nonid_dim": 16, "cbam_width": 4, "cbam_blocks": [1, 1],
        "irse_blocks": [1, 1, 1, 1], "irse_widths": [8, 8, 16, 16]}
BACKBONES = {"ir_se": {}, "cbam_resnet": {}, "convnextv2": {"convnext_name": "convnextv2_atto"}}


def _recipe(name: str = "photometric_mtl", info: DataInfo = INFO, **params):
    cls = get_recipe(name)
    return cls(build_dataclass(cls.Params, {**TINY, **params}, prefix="recipe.params"), info)


def _sample(identity: int, index: int) -> dict:
    """A decoded synthetic shard sample (what the stream hands to ``transform``)."""
    f = _sample_fields(SPEC, render_sample(SPEC, identity, index))
    return {**f, "__key__": f"id{identity}_s{index}"}


def _batch(recipe, train: bool = True) -> dict:
    return default_collate([recipe.transform(_sample(i, k), train) for i in range(4) for k in range(2)])


def photometric_overrides(tmp_path: Path, **extra: object) -> list[str]:
    """configs/photometric_*.yaml as a seconds-long CPU run."""
    values = {
        "experiment.output_dir": str(tmp_path / "runs"),
        "data.synthetic.cache_dir": str(tmp_path.parent / "synthetic-cache-photometric"),
        "data.synthetic.num_identities": 6,
        "data.synthetic.samples_per_identity": 8,
        "data.synthetic.image_size": 32,
        "data.batch_size": 8,
        "recipe.params.img_size": 32,
        "recipe.params.cbam_width": 4,
        "recipe.params.cbam_blocks": "[1,1]",
        "recipe.params.embedding_dim": 32,
        "recipe.params.nonid_dim": 8,
        "train.precision": "fp32",
        "train.max_steps": 3,
        "train.val_every_steps": 3,
        "train.log_every_steps": 1,
        "logging.progress": "false",
        "logging.plot": "false",
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def test_configs_are_valid_and_watch_several_metrics():
    for config, name in ((MTL_CONFIG, "photometric_mtl"), (CONCAT_CONFIG, "photometric_concat")):
        cfg = load_config(config, [])
        params = recipe_params(cfg)
        assert cfg.recipe.name == name and params.embedding_dim == 512
        assert cfg.train.early_stopping.metrics == ["identity_top1", "attr_mean_acc"]
        assert cfg.data.synthetic.modalities == ["maps"] and cfg.checkpoint.monitor == "score"
        assert params.magface_loss().check() is None            # the configs keep MagFace's lambda_g bound


def test_grl_steps_is_removed_with_one_line_and_stored_configs_still_load(tmp_path):
    from dist_train.config import ConfigError, config_from_dict, resolved_config_dict

    with pytest.raises(ConfigError) as err:
        load_config(MTL_CONFIG, photometric_overrides(tmp_path, recipe__params__grl_steps=200))
    line = str(err.value)
    assert "\n" not in line and "recipe.params.grl_steps" in line and "removed" in line
    cfg = load_config(MTL_CONFIG, photometric_overrides(tmp_path))
    tree = resolved_config_dict(cfg)
    tree["recipe"]["params"]["grl_steps"] = 200          # a model.pt / checkpoint of an older run
    assert recipe_params(config_from_dict(tree)) == recipe_params(cfg)
    assert "grl_steps" in tree["recipe"]["params"]      # the caller's dict is not changed


def test_the_grl_schedule_spans_the_runs_forwards():
    from dist_train.trainer import run_forwards

    # 7 micro-batches an epoch, accumulation 3: epochs of 3 steps (3 + 3 + 1 micro-batches)
    assert run_forwards(3, 7, 3) == 7 and run_forwards(5, 7, 3) == 13 and run_forwards(6, 7, 3) == 14
    assert run_forwards(4, 7, 1) == 4 and run_forwards(8, 4, 1) == 8
    recipe = _recipe()
    recipe.train_forwards = 13
    assert recipe.build_model().grl.total_steps == 13
    assert _recipe().build_model().grl.total_steps == 1    # no run: full strength at once


def test_seed_preset_has_the_originals_input_and_pk_batches():
    cfg = load_config(REPO / "configs" / "photometric_mtl" / "seed.yaml", [])
    params = recipe_params(cfg)
    assert params.img_size == 112 and cfg.data.synthetic.image_size == 112
    assert cfg.data.batching == "pk" and cfg.data.batch_size // cfg.data.pk_k == 8 and cfg.data.pk_k == 4
    assert cfg.recipe.name == "photometric_mtl" and params.backbone == "cbam_resnet"


def test_transform_reads_maps_and_aliased_labels():
    concat = _recipe("photometric_concat", augment=False)
    out = concat.transform(_sample(1, 3), train=False)
    assert out["albedo"].shape == (3, 32, 32) and out["normal"].shape == (3, 32, 32)
    assert out["depth"].shape == (1, 32, 32)
    assert abs(float(out["depth"].mean())) < 1e-4                  # depth standardised per sample
    labels = render_sample(SPEC, 1, 3)["labels"]
    assert int(out["identity"]) == 1 and int(out["pose"]) == labels["posture"]   # pose <- posture
    assert [a for a, _, _ in concat.tasks] == ["gender", "emotion", "pose", "facial_hair", "spectacles"]
    mtl = _recipe(modality="normal")
    assert set(mtl.transform(_sample(0, 0), True)) == {"image", "identity", "gender", "emotion", "pose",
                                                       "facial_hair", "spectacles"}


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_each_backbone_learns_a_batch(backbone):
    torch.manual_seed(0)
    recipe = _recipe(backbone=backbone, augment=False, **BACKBONES[backbone])
    model = recipe.build_model().train()
    batch = _batch(recipe)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    losses = []
    for _ in range(6):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        assert model.identity_head.weight.grad is not None and model.task_weighting.log_vars.grad is not None
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert out["embedding"].shape == (8, 32) and {"identity", "gender", "adv_gender"} <= set(out["terms"])


def test_concat_embeds_three_networks_and_metrics_cover_every_task():
    torch.manual_seed(0)
    recipe = _recipe("photometric_concat")
    model = recipe.build_model().eval()
    batch = _batch(recipe, train=False)
    with torch.no_grad():
        out = model(batch)
    assert set(model.encoders) == {"albedo", "normal", "depth"} and out["embedding"].shape == (8, 3 * 32)
    metrics = recipe.new_metrics()
    assert metrics.attributes == model.attributes and len(model.attributes) >= 3
    # Predictions of known accuracy (an untrained model predicts one class, whose accuracy any
    # pairing of labels and predictions reproduces): the k-th task gets its first k + 1 rows wrong.
    scored = dict(out)
    for k, task in enumerate(("identity", *model.attributes)):
        logits = out[f"{task}_logits"]
        pred = batch[task].clone()
        pred[:k + 1] = (pred[:k + 1] + 1) % logits.shape[1]
        scored[f"{task}_logits"] = torch.nn.functional.one_hot(pred, logits.shape[1]).float() * 5.0
    metrics.update(scored, batch)
    res = type(metrics).compute([metrics.state()])
    for key in ("identity_top1", "gender_acc", "emotion_macro_f1", "pose_auc", "spectacles_acc", "attr_mean_acc",
                "score", "eer", "auc"):
        assert key in res, key
    accs = [(8 - (k + 2)) / 8 for k in range(len(model.attributes))]
    assert res["identity_top1"] == 7 / 8                          # counts of 8: exact in float64
    assert [res[f"{a}_acc"] for a in model.attributes] == accs
    assert res["attr_mean_acc"] == pytest.approx(np.mean(accs), rel=4 * np.finfo(np.float64).eps)
    assert 0.0 <= res["eer"] <= 1.0


def test_concat_refuses_data_without_a_modality_in_one_line(tmp_path):
    from recipes.photometric import MissingModalityError

    no_depth = DataInfo(identities=INFO.identities, twin_pairs=(), label_schemas=INFO.label_schemas,
                        modalities=("albedo.npy", "json", "normal.npy"))
    with pytest.raises(MissingModalityError, match="lack depth.npy") as exc:
        _recipe("photometric_concat", info=no_depth)
    assert "\n" not in str(exc.value)
    _recipe("photometric_mtl", info=no_depth, modality="albedo")      # one modality present: fine
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([PYTHON, "dist_train/main.py", "--config", str(CONCAT_CONFIG),
                           *photometric_overrides(tmp_path, data__synthetic__modalities="[vis]")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "lack albedo.npy, normal.npy, depth.npy" in proc.stderr and not (tmp_path / "runs").exists()


def _check_summaries(m: dict, prefix: str) -> None:
    """A run's summaries are the means of its accuracies: attr_mean_acc of the attribute
    accuracies, score of those and identity_top1 (the batch-level values: the concat test)."""
    accs = [m[f"{prefix}{a}_acc"] for a in ATTRIBUTE_ALIASES]
    top1 = m[f"{prefix}identity_top1"]
    assert m[f"{prefix}attr_mean_acc"] == pytest.approx(np.mean(accs), rel=4 * np.finfo(np.float64).eps)
    assert m[f"{prefix}score"] == pytest.approx(np.mean([top1, *accs]), rel=4 * np.finfo(np.float64).eps)


@pytest.mark.parametrize("config", [MTL_CONFIG, CONCAT_CONFIG], ids=["mtl", "concat"])
def test_both_recipes_train_under_the_trainer(tmp_path, config, monkeypatch):
    from dist_train.main import train
    from recipes import photometric

    grls = []  # the GRL of the trained model: its schedule spans exactly the run's forwards

    class Recorded(photometric.GradientReversal):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            grls.append(self)

    monkeypatch.setattr(photometric, "GradientReversal", Recorded)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = train(load_config(config, photometric_overrides(tmp_path, logging__tracking="none")), None)
    finally:
        torch.set_num_threads(threads)
    # train.max_steps=3, no accumulation: 3 forwards, the last one at progress 2/3; lambda reaches
    # grl_lambda(1) exactly when the run ends (a fixed grl_steps made it 1000 forwards)
    assert grls[0].total_steps == 3 and int(grls[0].steps) == 3
    (run,) = list((tmp_path / "runs").iterdir())
    _check_summaries(metrics, "")
    assert (run / "plots" / "confusion_matrices.png").stat().st_size > 1000
    final = json.loads((run / "final_metrics.json").read_text())
    assert "test_identity_top1" in final and "test_spectacles_auc" in final
    header = (run / "logs" / "train_logs.csv").read_text().splitlines()[0]
    assert "identity" in header and "adv_gender" in header


@pytest.mark.integration
def test_both_recipes_train_under_two_process_torchrun(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for config, name in ((MTL_CONFIG, "mtl"), (CONCAT_CONFIG, "concat")):
        out = tmp_path / name
        cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dist_train/main.py",
               "--config", str(config), *photometric_overrides(out, logging__tracking="none",
                                                              recipe__params__backbone="ir_se",
                                                              recipe__params__irse_blocks="[1,1,1,1]",
                                                              recipe__params__irse_widths="[4,4,8,8]")]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (run,) = list((out / "runs").iterdir())
        final = json.loads((run / "final_metrics.json").read_text())
        _check_summaries(final, "test_")
        assert (run / "plots" / "confusion_matrices.png").is_file() and (run / "model.pt").is_file()


def test_cmu_faces_feed_photometric_mtl_as_one_grey_modality(tmp_path):
    from shards.cli import run as shards_cli
    from shards.manifest import Manifest
    from shards.stream import build_eval_loader
    from tests.conftest import shared_dataset

    raw = shared_dataset("cmu_faces")
    out = tmp_path / "cmu"
    assert shards_cli(["create", "--format", "cmu", "--input", str(raw), "--output", str(out), "--scale", "4",
                       "--split-by", "sample", "--workers", "1", "--no-progress"]) == 0
    info = Manifest.load(out).data_info()
    with pytest.raises(ValueError, match="lack albedo.npy"):
        _recipe("photometric_mtl", info=info)                       # no photometric maps in CMU faces
    recipe = _recipe("photometric_mtl", info=info, modality="image", attributes=["pose", "emotion", "spectacles"])
    # pose <- pose, emotion <- expression, spectacles <- sunglasses; no gender / facial hair labels
    assert [(a, k, c) for a, k, c in recipe.tasks] == [("pose", "pose", 4), ("emotion", "expression", 4),
                                                      ("spectacles", "sunglasses", 2)]
    batch = next(iter(build_eval_loader(out, "test", recipe.transform, 8, 0, 1, 0)))
    assert batch["image"].shape == (8, 1, 32, 32) and int(batch["identity"].min()) >= 0
    torch.manual_seed(0)
    out_ = recipe.build_model().train()(batch)
    assert torch.isfinite(out_["loss"]) and set(out_["terms"]) >= {"pose", "emotion", "spectacles", "identity"}


def test_confusion_matrices_are_readable_panels_not_a_strip(tmp_path):
    """Four tasks (40 identities and three attributes): at most three panels a row,
    each matrix at least 15 px per class in the PNG, counts in >= 9 pt."""
    from recipes.photometric import CONFUSION_DPI, confusion_figure

    rng = np.random.default_rng(0)
    classes = {"identity": 40, "gender": 2, "ethnicity": 4, "age": 5}
    preds = {t: (rng.integers(0, c, 200), rng.integers(0, c, 200)) for t, c in classes.items()}
    fig = confusion_figure(preds, classes, {"gender": ("female", "male")})
    fig.set_dpi(CONFUSION_DPI)
    shown = [ax for ax in fig.axes if ax.get_visible() and ax.get_images()]
    assert len(shown) == 4
    rows = {round(ax.get_position().y0, 3) for ax in shown}
    assert len(rows) == 2                                        # a grid, not one strip
    for ax in shown:
        c = classes[ax.get_title().split()[0]]
        width_px = ax.get_window_extent().width
        assert width_px / c >= 15, (ax.get_title(), width_px)
        if c <= 12:
            assert len(ax.texts) == c * c and min(t.get_fontsize() for t in ax.texts) >= 9
    gender = next(ax for ax in shown if ax.get_title().startswith("gender"))
    assert [t.get_text() for t in gender.get_xticklabels()] == ["female", "male"]
    import matplotlib.pyplot as plt

    plt.close(fig)


# ----------------------------------------------------------------------------- the 8-bit hand-off

GREY_INFO = DataInfo(identities=tuple(f"p{i}" for i in range(4)), twin_pairs=(), label_schemas={},
                     modalities=("json", "png"))


def _grey_sample(i: int, size=(40, 36)) -> dict:
    from PIL import Image

    pixels = np.random.default_rng(i).integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    return {"png": Image.fromarray(pixels, "L"), "json": {"identity": i % 4}, "__key__": f"g{i}"}


def test_grey_training_images_are_8_bit_and_reach_the_network_as_the_evaluation_floats():
    """Modality image (8-bit captures: CMU faces): the workers hand over uint8 pixels; the
    evaluation transform rounds its resize to the same 8 bits and normalises them with the
    device's arithmetic, so unaugmented the training forward is the evaluation's exactly. The
    rounding moves the evaluation input by at most half a level from the float resize."""
    from recipes.photometric import _resize

    r = _recipe(modality="image", augment=False, attributes=[], info=GREY_INFO)
    samples = [_grey_sample(i) for i in range(4)]
    train = default_collate([r.transform(s, True) for s in samples])
    floats = default_collate([r.transform(s, False) for s in samples])
    assert train["image"].dtype == torch.uint8 and floats["image"].dtype == torch.float32
    assert "noise_seed" not in train                                   # no augmentation, no noise
    model = r.build_model()
    assert torch.equal(model.pixels(train["image"]), floats["image"])  # the same floats, bit for bit
    model.train()
    torch.manual_seed(0)
    a = model(train)
    torch.manual_seed(0)
    b = model(floats)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["embedding"], b["embedding"])
    # the float path (resize, then (x / 255 - 0.5) / 0.25): within half a level, 0.5 / (255 * 0.25),
    # plus both paths' few roundings on values of magnitude <= 2
    exact = torch.stack([(_resize(torch.from_numpy(np.asarray(s["png"], np.float32))[None], 32) / 255 - 0.5) / 0.25
                         for s in samples])
    half_level = 0.5 / (255 * 0.25)
    gap = (floats["image"] - exact).abs().max().item()
    assert gap <= half_level * (1 + ops_rtol(4)) + 2 * 2 * ops_rtol(4)
    assert gap > half_level / 2                                        # (the resize does leave between-levels)


def test_grey_augmentation_noise_is_added_after_the_hand_off_from_the_workers_seed():
    """The crop stays in the workers (a convex mix of pixels: 8 bits hold it); the noise
    cannot (it would be clipped at 0 and 255 and rounded), so the worker draws its seed
    and the model adds it in training: noise_std times the row's own std, the same numbers
    for the same seed (no global RNG), none for -1 and none in evaluation."""
    r = _recipe(modality="image", attributes=[], info=GREY_INFO, p_crop=0.0, p_noise=1.0, noise_std=0.05)
    torch.manual_seed(0)
    train = default_collate([r.transform(_grey_sample(i, (32, 32)), True) for i in range(4)])
    assert train["image"].dtype == torch.uint8 and train["noise_seed"].dtype == torch.long
    assert (train["noise_seed"] >= 0).all() and len(set(train["noise_seed"].tolist())) == 4
    model = r.build_model().train()
    clean = model.pixels(train["image"])
    noisy = model.network_inputs(train)["image"]
    assert torch.equal(noisy, model.network_inputs(train)["image"])    # from the seeds, not a global RNG
    noise = (noisy - clean).flatten(1)
    ratio = noise.std(1) / clean.flatten(1).std(1)
    # a sample std of n = 1024 normal values: relative spread 1 / sqrt(2 (n - 1)) = 2.2 %; 5 of them
    assert torch.allclose(ratio, torch.full_like(ratio, 0.05), rtol=5 / np.sqrt(2 * 1023), atol=0)
    assert noise.mean(1).abs().max() < 5 * 0.05 * clean.flatten(1).std(1).max() / 32
    off = {**train, "noise_seed": torch.tensor([-1, train["noise_seed"][1].item(), -1, -1])}
    moved = (model.network_inputs(off)["image"] != clean).flatten(1).any(1).tolist()
    assert moved == [False, True, False, False]
    assert torch.equal(model.network_inputs(off)["image"][1], noisy[1])
    assert torch.equal(model.eval().network_inputs(train)["image"], clean)   # evaluation: no noise
    # no noise drawn (p_noise 0): seeds -1, the pixels as they are
    quiet = _recipe(modality="image", attributes=[], info=GREY_INFO, p_crop=0.0, p_noise=0.0)
    assert (default_collate([quiet.transform(_grey_sample(i), True) for i in range(4)])["noise_seed"] == -1).all()


def test_maps_leave_the_workers_as_floats_unless_asked_and_8_bits_move_them_by_half_a_level():
    """Depth and normals are float by nature: by default they are handed over as float32
    (exact). With maps_8bit each channel of each sample is quantised over its own range
    [low, high]; the network then sees every value within half a level, (high - low) / 510,
    of the float map (plus float32 rounding: the quantising division and the dequantising
    multiply-add), and the rounding does use that half level (floor would use a whole one)."""
    from recipes.photometric import MAPS

    floats = _recipe("photometric_concat")
    batch = _batch(floats, train=True)
    assert all(batch[k].dtype == torch.float32 for k in MAPS) and "noise_seed" not in batch
    r = _recipe("photometric_concat", maps_8bit=True, augment=False)
    train, evaluation = _batch(r, train=True), _batch(r, train=False)
    assert all(train[k].dtype == torch.uint8 and train[f"{k}_range"].shape == (8, MAP_CHANNELS[k], 2) for k in MAPS)
    assert not any(f"{k}_range" in evaluation for k in MAPS)
    seen = r.build_model().network_inputs(train)
    worst = 0.0
    for k in MAPS:
        low, high = evaluation[k].flatten(2).amin(2), evaluation[k].flatten(2).amax(2)
        assert torch.equal(train[f"{k}_range"], torch.stack([low, high], 2))
        level = ((high - low) / 255)[..., None, None]
        bound = level * (0.5 + 255 * ops_rtol(3)) + ops_rtol(2) * 2 * (low.abs() + high.abs())[..., None, None]
        err = (seen[k] - evaluation[k]).abs()
        assert (err <= bound).all(), k
        worst = max(worst, float((err / level).max()))
    assert worst > 0.4
    # and training runs on them (the maps' augmentations happen before the hand-off)
    aug = _recipe("photometric_concat", maps_8bit=True, p_crop=1.0, p_noise=1.0)
    torch.manual_seed(0)
    out = aug.build_model().train()(_batch(aug, train=True))
    assert torch.isfinite(out["loss"])


# ----------------------------------------------------------------------------- biomtl extract --feature-type

def test_extract_gives_the_backbone_and_non_identity_features_and_refuses_others(tmp_path, capsys):
    """photometric_mtl with the Feature Separation Module: the identity embedding (default),
    the backbone's pooled features before the FSM, and the FSM's non-identity part; another
    type is one line naming the choices, exit 2, nothing written."""
    from PIL import Image

    from dist_train.cli import main
    from dist_train.config import resolved_config_dict
    from dist_train.inference import InferenceEngine
    from recipes.model_file import model_file

    cfg = load_config(MTL_CONFIG, [*photometric_overrides(tmp_path), "recipe.params.modality=image",
                                   "recipe.params.attributes=[]"])
    recipe = get_recipe("photometric_mtl")(recipe_params(cfg), GREY_INFO)
    torch.manual_seed(0)
    model = recipe.build_model()
    torch.save(model_file(model.state_dict(), resolved_config_dict(cfg), GREY_INFO.to_dict()), tmp_path / "model.pt")
    images = tmp_path / "imgs"
    for i in range(3):
        (images / f"s{i}").mkdir(parents=True)
        _grey_sample(i)["png"].save(images / f"s{i}" / "a.png")
    engine = InferenceEngine.from_checkpoint(tmp_path / "model.pt", device="cpu")
    x = engine.preprocess(sorted(images.rglob("*.png")))
    model.eval()
    with torch.no_grad():
        expected = {"embedding": model.embed(x), "non_identity": model.encoders["image"].fsm(
                    model.encoders["image"].backbone(x))[1], "backbone": model.encoders["image"].backbone(x)}
    dims = {"embedding": 32, "non_identity": 8, "backbone": model.encoders["image"].backbone.num_features}
    got = {}
    for kind in ("embedding", "backbone", "non_identity"):
        out = tmp_path / f"{kind}.npz"
        capsys.readouterr()
        assert main(["extract", "--checkpoint", str(tmp_path / "model.pt"), "--images", str(images),
                     "--output", str(out), "--feature-type", kind, "--device", "cpu", "--no-progress"]) == 0
        z = np.load(out)
        want = torch.nn.functional.normalize(expected[kind].float(), dim=1).numpy()
        assert str(z["feature_type"]) == kind and z["features"].shape == (3, dims[kind])
        # the same network on the same input, then one normalisation (tests/tolerance.py)
        assert np.allclose(z["features"], want, rtol=0, atol=2 * ops_rtol(2 * (dims[kind] + 2))), kind
        got[kind] = z["features"]
    # three kinds of features, not one under three names (the CBAM net's pooled features are 32-d too)
    assert not np.allclose(got["backbone"], got["embedding"], rtol=0, atol=0.05)
    out = tmp_path / "bad.npz"
    capsys.readouterr()
    rc = main(["extract", "--checkpoint", str(tmp_path / "model.pt"), "--images", str(images), "--output", str(out),
               "--feature-type", "albedo", "--device", "cpu", "--no-progress"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert rc == 2 and lines == ["error: --feature-type albedo: recipe photometric_mtl gives "
                                 "embedding|backbone|non_identity"] and not out.exists()
    # without the FSM the backbone's features are the embedding: one type
    plain = get_recipe("photometric_mtl")(recipe_params(load_config(MTL_CONFIG, [
        *photometric_overrides(tmp_path), "recipe.params.modality=image", "recipe.params.separation=false",
        "recipe.params.attributes=[]"])), GREY_INFO)
    assert plain.feature_types() == ("embedding",)
