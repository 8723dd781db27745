"""Shared model pieces (backbones, heads, augmentations, losses) and the FaceCom recipe."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from recipes.base import DataInfo, get_recipe
from tests.conftest import artifact_context
from tests.tolerance import cosine_atol, logsumexp_atol, ops_rtol, sum_atol
from models import augment
from models.backbones import WeightsError, build_backbone, read_state_dict
from models.heads import ArcFace, CosFace, LinearHead, build_identity_head
from models.pixels import IMAGENET_MEAN, IMAGENET_STD
from models.losses import DynamicLossWeights, SupConLoss, TwinAwareTripletLoss, masked_cross_entropy, weighted_sum
from recipes.facecom import FaceComMetrics, FaceComParams, FaceComRecipe


# ----------------------------------------------------------------------------- heads

@pytest.mark.parametrize("cls,m", [(ArcFace, 0.5), (CosFace, 0.35)])
def test_margin_heads_reduce_only_target_logit(cls, m):
    torch.manual_seed(0)
    head = cls(16, 7, s=30.0, m=m)
    emb = torch.randn(5, 16)
    labels = torch.tensor([0, 3, 6, 2, 2])
    head.eval()
    plain = head(emb, labels)                     # eval: no margin even with labels
    assert torch.equal(plain, head(emb))                         # the same kernels: exact
    cos = head.cosine(emb)
    assert torch.equal(plain, 30.0 * cos)
    head.train()
    marg = head(emb, labels)
    rows = torch.arange(5)
    other = torch.ones_like(marg, dtype=torch.bool)
    other[rows, labels] = False
    assert torch.equal(marg[other], plain[other])              # non-target logits untouched
    cy = cos[rows, labels]
    if cls is CosFace:
        expected = 30.0 * (cy - m)                               # CosFace subtracts m*s
    else:
        theta = torch.acos(cy.clamp(-1, 1))
        expected = torch.where(cy > math.cos(math.pi - m), 30.0 * torch.cos(theta + m),
                               30.0 * (cy - math.sin(math.pi - m) * m))
    # two float32 formulas of s cos(theta + m) (acos then cos vs the angle-sum identity): a dozen
    # roundings and 3 elementary functions, acos amplifying its argument's error by 1 / sin(theta)
    sin_min = float((1 - cy.abs().amax() ** 2).sqrt())
    assert torch.allclose(marg[rows, labels], expected, rtol=0, atol=30.0 * 2 * ops_rtol(12, 3) / sin_min)
    assert (marg[rows, labels] < plain[rows, labels]).all()


def test_arcface_exact_angle():
    head = ArcFace(2, 2, s=10.0, m=0.3).train()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    emb = torch.tensor([[math.cos(0.4), math.sin(0.4)]])         # 0.4 rad from class 0
    out = head(emb, torch.tensor([0]))
    # float32 against float64: the embedding's rounding, the 2-d cosine, the margin's identity (a
    # dozen roundings, 2 elementary functions), times s = 10
    assert out[0, 0].item() == pytest.approx(10 * math.cos(0.7), rel=0, abs=10 * ops_rtol(12, 2))
    assert out[0, 1].item() == pytest.approx(10 * math.sin(0.4), rel=0, abs=10 * (cosine_atol(2) + ops_rtol(2)))


def test_ignore_label_and_linear_head():
    head = CosFace(8, 4).train()
    emb = torch.randn(3, 8)
    out = head(emb, torch.tensor([-1, -1, -1]))
    assert torch.equal(out, head.s * head.cosine(emb))          # the same kernels: exact
    lin = build_identity_head("linear", 8, 4)
    assert isinstance(lin, LinearHead) and lin(emb, torch.tensor([0, 1, 2])).shape == (3, 4)
    with pytest.raises(ValueError):
        build_identity_head("magface", 8, 4)


# ----------------------------------------------------------------------------- losses

def test_loss_helpers():
    a, b = torch.tensor(2.0), torch.tensor(3.0)
    # small dyadic values and exp(-0) = 1: the arithmetic is exact
    assert weighted_sum({"a": a, "b": b}, {"a": 0.5}).item() == 4.0
    dyn = DynamicLossWeights(["a", "b"])
    assert dyn({"a": a, "b": b}).item() == 0.5 * 5.0  # w = 0 -> 0.5 * sum
    dyn({"a": a, "b": b}).backward()
    assert dyn.log_vars.grad is not None and torch.isfinite(dyn.log_vars.grad).all()
    logits = torch.randn(4, 3, requires_grad=True)
    z = masked_cross_entropy(logits, torch.tensor([-1, -1, -1, -1]))
    assert z.item() == 0.0
    z.backward()                                      # graph-connected zero
    ce = masked_cross_entropy(logits, torch.tensor([0, -1, 2, -1]))
    ref = torch.nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([0, 2]))
    # Each row's loss is within logsumexp_atol of exact (with smoothing: also the mean of the 3
    # classes' -log p, each within the same bound); a (weighted) mean of such values stays within
    # it, plus the rounding of its two sums of <= 4 terms (sum_atol of |terms| <= wmax/wmin |ref|).
    row = logsumexp_atol(3, float(logits.abs().amax()))

    def ce_atol(ref_value: float, weight_ratio: float = 1.0) -> float:
        return 2 * row + 2 * sum_atol(4, weight_ratio * abs(ref_value))

    assert ce.item() == pytest.approx(ref.item(), rel=0, abs=ce_atol(ref.item()))
    # a label >= C counts for nothing (training transforms refuse such samples: recipes/labels.py)
    out_of_range = masked_cross_entropy(logits, torch.tensor([0, 3, 1, 1]))
    ref = torch.nn.functional.cross_entropy(logits[[0, 2, 3]], torch.tensor([0, 1, 1]))
    assert out_of_range.item() == pytest.approx(ref.item(), rel=0, abs=ce_atol(ref.item()))
    w = torch.tensor([0.2, 1.0, 3.0])                 # class weights + smoothing: F.cross_entropy's mean
    ce = masked_cross_entropy(logits, torch.tensor([0, -1, 2, 1]), label_smoothing=0.1, weight=w)
    ref = torch.nn.functional.cross_entropy(logits, torch.tensor([0, -1, 2, 1]), weight=w, label_smoothing=0.1,
                                            ignore_index=-1)
    assert ce.item() == pytest.approx(ref.item(), rel=0, abs=ce_atol(ref.item(), float(w.max() / w.min())))


def test_metric_losses_twin_aware():
    torch.manual_seed(0)
    ident = torch.tensor([0, 0, 1, 1, 2, 2])
    twin = torch.tensor([1, 1, 0, 0, -1, -1])        # identities 0 and 1 are twins
    emb = torch.randn(6, 8, requires_grad=True)
    for loss_fn in (TwinAwareTripletLoss(0.3), SupConLoss(0.1, twin_negative_weight=2.0)):
        loss = loss_fn(emb, ident, twin)
        assert torch.isfinite(loss) and loss.item() > 0
        loss.backward()
    # A perfectly separated batch has zero triplet loss.
    sep = torch.eye(6)[[0, 0, 2, 2, 4, 4]]
    assert TwinAwareTripletLoss(0.3)(sep, ident, twin).item() == pytest.approx(0.0)


# ----------------------------------------------------------------------------- backbones

def test_backbone_local_weights_roundtrip(tmp_path):
    torch.manual_seed(0)
    src, dim = build_backbone("resnet18", False)
    assert dim == 512
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}   # a DDP-style checkpoint
    sd["module.fc.weight"] = torch.randn(10, 512)                   # classifier: dropped
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": sd}, path)
    torch.manual_seed(1)
    dst, _ = build_backbone("resnet18", str(path))
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), k
    assert dst.weights_report.dropped_classifier == ["fc.weight"]
    x = torch.randn(2, 3, 32, 32)
    src.eval(), dst.eval()
    assert torch.allclose(src(x), dst(x))


def test_backbone_safetensors_vit_resamples_pos_embed(tmp_path):
    from safetensors.torch import save_file

    kw = dict(patch_size=8, depth=1)
    src, dim = build_backbone("vit_tiny_patch16_224", False, img_size=32, **kw)
    assert dim == 192
    path = tmp_path / "vit.safetensors"
    save_file(src.state_dict(), str(path))
    same, _ = build_backbone("vit_tiny_patch16_224", str(path), img_size=32, **kw)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), same.state_dict().values()))
    bigger, _ = build_backbone("vit_tiny_patch16_224", str(path), img_size=48, **kw)  # 4x4 -> 6x6 grid
    assert bigger.pos_embed.shape == (1, 37, 192)
    assert torch.equal(bigger.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_backbone_bad_weights_raise(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        build_backbone("resnet18", str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        build_backbone("resnet18", str(junk))
    other, _ = build_backbone("vit_tiny_patch16_224", False, img_size=32, patch_size=8, depth=1)
    wrong = tmp_path / "vit.pth"
    torch.save(other.state_dict(), wrong)
    with pytest.raises(WeightsError, match="match"):
        build_backbone("resnet18", str(wrong))               # another architecture
    r18, _ = build_backbone("resnet18", False)
    partial = {k: v for k, v in r18.state_dict().items() if not k.startswith("layer4")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="missing"):
        build_backbone("resnet18", str(tmp_path / "partial.pth"))
    r34, _ = build_backbone("resnet34", False)
    torch.save(r34.state_dict(), tmp_path / "r34.pth")
    with pytest.raises(WeightsError, match="no place in the model"):
        build_backbone("resnet18", str(tmp_path / "r34.pth"))    # bigger sibling: extra blocks
    loose, _ = build_backbone("resnet18", str(tmp_path / "r34.pth"), strict=False)
    assert len(loose.weights_report.unexpected) > 0
    with pytest.raises(WeightsError):
        build_backbone("resnet18", True)                    # offline: timm hub cannot be reached
    assert isinstance(read_state_dict(tmp_path / "r34.pth"), dict)


# ----------------------------------------------------------------------------- augmentations

def _face(size: int = 48) -> Image.Image:
    rng = np.random.default_rng(0)
    arr = (rng.random((size, size, 3)) * 120 + 60).astype(np.uint8)
    arr[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 220
    return Image.fromarray(arr, "RGB")


ALL_AUGS = [augment.RandomGaussianBlur(1.0), augment.RandomGaussianNoise(1.0), augment.RandomLowLight(1.0),
            augment.RandomHaze(1.0), augment.RandomJpeg(1.0)]


@pytest.mark.parametrize("aug", ALL_AUGS, ids=lambda a: type(a).__name__)
def test_augmentation_reproducible_and_changes_image(aug):
    img = _face()
    torch.manual_seed(123)
    a = np.asarray(aug(img))
    torch.manual_seed(123)
    b = np.asarray(aug(img))
    assert np.array_equal(a, b)
    assert a.shape == np.asarray(img).shape
    assert np.abs(a.astype(float) - np.asarray(img).astype(float)).mean() > 1.0
    t = torch.rand(3, 32, 32)                                 # also on tensors, same kind out
    torch.manual_seed(5)
    out = aug(t)
    assert isinstance(out, torch.Tensor) and out.shape == t.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, t)


def test_augmentation_probability_and_composition():
    img = _face()
    assert augment.RandomJpeg(0.0)(img) is img
    comp = augment.degradation_transforms(0.5, 0.5, 0.5, 0.5, 0.5)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(np.asarray(comp(img)))
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])
    low = np.asarray(augment.RandomLowLight(1.0)(img)).mean()
    haze = np.asarray(augment.RandomHaze(1.0, airlight=(1.0, 1.0))(img)).astype(float)
    assert low < np.asarray(img).mean()
    assert haze.std() < np.asarray(img).astype(float).std()          # haze washes out contrast


# ----------------------------------------------------------------------------- recipe

def _info(n_id: int = 5) -> DataInfo:
    return DataInfo(identities=tuple(f"id{i}" for i in range(n_id)), twin_pairs=(),
                    label_schemas={"gender": ("female", "male")}, modalities=("vis",))


def _recipe(**kw) -> FaceComRecipe:
    params = FaceComParams(**{"backbone": "resnet18", "img_size": 32, "embedding_dim": 16, **kw})
    return FaceComRecipe(params, _info())


def test_recipe_registered_and_params_validate():
    assert get_recipe("facecom") is FaceComRecipe
    with pytest.raises(ValueError):
        FaceComParams(p_blur=1.5)
    with pytest.raises(ValueError):
        FaceComParams(pretrained=True, weights_path="/x.pth")


def test_transform_keys_and_determinism():
    r = _recipe()
    sample = {"__key__": "a", "vis.png": _face(40), "json": {"identity": 3, "gender": 1}}
    torch.manual_seed(7)
    x = r.transform(sample, train=True)
    torch.manual_seed(7)
    y = r.transform(sample, train=True)
    # training hands 8-bit pixels to the loader; the network normalises them
    assert x["image"].shape == (3, 32, 32) and x["image"].dtype == torch.uint8
    assert torch.equal(x["image"], y["image"])
    assert x["identity"].item() == 3 and x["gender"].item() == 1 and x["identity"].dtype == torch.long
    grey = {"jpg": _face(40).convert("L"), "json": {"identity": 1}}
    z = r.transform(grey, train=False)
    assert z["image"].shape == (3, 32, 32) and z["gender"].item() == -1
    with pytest.raises(KeyError):
        r.transform({"json": {}}, train=False)


def test_training_pixels_reach_the_network_as_the_evaluation_floats():
    """Without augmentation the train transform (uint8) and the eval transform (normalised
    float) resize alike; the model must embed both to the same vector."""
    r = _recipe(augment=False)
    sample = {"__key__": "a", "vis.png": _face(40), "json": {"identity": 3}}
    pixels, floats = r.transform(sample, train=True)["image"], r.transform(sample, train=False)["image"]
    assert pixels.dtype == torch.uint8 and floats.dtype == torch.float32
    model = r.build_model().eval()
    with torch.no_grad():
        # two orders of (x / 255 - mean) / std, as tests/models/test_pixels.py bounds them
        pixel_tol = 2 * ops_rtol(6) * (1 + max(IMAGENET_MEAN)) / min(IMAGENET_STD)
        assert torch.allclose(model.pixels(pixels[None]), floats[None], rtol=0, atol=pixel_tol)
        # and the network then sees exactly those floats: the 8-bit path is PixelInput, then the same net
        assert torch.equal(model.embed(pixels[None]), model.embed(model.pixels(pixels[None])))


def test_random_erasing_fills_with_the_mean_colour():
    r = _recipe(p_erase=1.0, crop_scale_min=1.0, p_flip=0.0, p_blur=0, p_noise=0, p_low_light=0, p_haze=0,
                p_jpeg=0)
    img = Image.new("RGB", (40, 40), (255, 255, 255))
    torch.manual_seed(0)
    out = r.transform({"__key__": "a", "vis.png": img, "json": {"identity": 0}}, train=True)["image"]
    erased = (out != 255).any(0)
    assert erased.any() and not erased.all()
    assert out[:, erased].T.unique(dim=0).tolist() == [[124, 116, 104]]


@pytest.mark.parametrize("head", ["linear", "arcface", "cosface"])
def test_facecom_forward_backward(head):
    torch.manual_seed(0)
    r = _recipe(identity_head=head)
    model = r.build_model().train()
    batch = {"image": torch.randn(4, 3, 32, 32), "identity": torch.tensor([0, 1, 2, -1]),
             "gender": torch.tensor([0, 1, 1, 0])}
    out = model(batch)
    assert set(out["terms"]) == {"gender", "identity"}
    assert torch.isfinite(out["loss"])
    expected = 0.3 * out["terms"]["gender"] + 1.0 * out["terms"]["identity"]
    # one weighted sum of two positive terms in another order: the products and the sum round
    assert out["loss"].item() == pytest.approx(expected.item(), rel=2 * ops_rtol(2 + 1), abs=0)
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert out["gender_logits"].shape == (4, 2) and out["identity_logits"].shape == (4, 5)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(batch)["loss"])


def test_metrics_known_numbers():
    m = FaceComMetrics()
    g_true = torch.tensor([1, 1, 0, 0, 1, 0])
    g_pred = torch.tensor([1, 0, 0, 1, 1, 1])     # last row is padding (invalid)
    i_true = torch.tensor([0, 1, 2, 3, 0, 0])
    i_pred = torch.tensor([0, 1, 2, 0, 1, 0])
    valid = torch.tensor([True, True, True, True, True, False])
    half = 3                                      # two ranks' worth of states
    states = []
    for sl in (slice(0, half), slice(half, 6)):
        mm = FaceComMetrics()
        mm.update({"gender_logits": torch.nn.functional.one_hot(g_pred[sl], 2).float(),
                   "identity_logits": torch.nn.functional.one_hot(i_pred[sl], 4).float()},
                  {"gender": g_true[sl], "identity": i_true[sl], "_valid": valid[sl]})
        states.append(mm.state())
    out = FaceComMetrics.compute(states)
    # valid rows: gender true [1,1,0,0,1] pred [1,0,0,1,1] -> TP=2 FP=1 FN=1 TN=1
    assert out["gender_acc"] == pytest.approx(3 / 5)
    assert out["gender_precision"] == pytest.approx(2 / 3)
    assert out["gender_recall"] == pytest.approx(2 / 3)
    assert out["gender_f1"] == pytest.approx(2 / 3)
    assert out["gender_macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # identity true [0,1,2,3,0] pred [0,1,2,0,1]: top1 3/5; per-class F1: 0:0.5, 1:2/3, 2:1, 3:0
    assert out["identity_top1"] == pytest.approx(3 / 5)
    assert out["identity_macro_f1"] == pytest.approx((0.5 + 2 / 3 + 1 + 0) / 4)
    assert out["combined"] == pytest.approx(0.3 * out["gender_macro_f1"] + 0.7 * out["identity_macro_f1"])
    assert all(isinstance(v, float) for v in out.values())
    empty = FaceComMetrics.compute([FaceComMetrics().state()])
    assert math.isnan(empty["combined"])


def test_write_artifacts(tmp_path):
    torch.manual_seed(0)
    r = _recipe(identity_head="linear")
    model = r.build_model()
    history = [{"step": 1, "epoch": 0, "loss": 2.0, "gender_acc": 0.5, "identity_top1": 0.1, "combined": 0.2},
               {"step": 2, "epoch": 0, "loss": 1.5, "gender_acc": 0.6, "identity_top1": 0.3, "combined": 0.4}]
    batches = [{"image": torch.randn(3, 3, 32, 32), "identity": torch.tensor([0, 1, 2]),
                "gender": torch.tensor([0, 1, 0]), "_valid": torch.tensor([True, True, False]),
                "__key__": ["k2", "k1", "pad"]}]
    metrics = r.write_artifacts(model, artifact_context(tmp_path, {"test": batches}, validation_history=history))
    assert model.training                                      # mode restored
    lines = (tmp_path / "submission.csv").read_text().splitlines()
    assert lines[0] == "key,gender,gender_confidence,identity,confidence"
    assert [ln.split(",")[0] for ln in lines[1:]] == ["k1", "k2"]
    assert lines[1].split(",")[1] in ("female", "male") and lines[1].split(",")[3].startswith("id")
    assert (tmp_path / "plots" / "training_metrics.png").stat().st_size > 1000
    assert 0.0 <= metrics["identity_top1"] <= 1.0
    # No test loader and no log: nothing fails, nothing returned.
    other = tmp_path / "other"
    assert r.write_artifacts(model, artifact_context(other, {})) == {}
    assert not (other / "plots" / "training_metrics.png").exists()


def _artifacts_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)                                   # same weights on both ranks
        r = _recipe(identity_head="linear")
        model = r.build_model()
        keys = [[f"r{rank}_a", f"r{rank}_b"], [f"r{rank}_c", "pad"]]
        batches = [{"image": torch.randn(2, 3, 32, 32), "identity": torch.tensor([0, 1]),
                    "gender": torch.tensor([0, 1]), "_valid": torch.tensor([True, k[1] != "pad"]),
                    "__key__": k} for k in keys]
        metrics = r.write_artifacts(model, artifact_context(Path(run_dir), {"test": batches}, is_main=rank == 0))
        from recipes.metrics_json import json_text  # (a metric not computed is a NaN with its reason: null)

        (Path(run_dir) / f"metrics{rank}.json").write_text(json_text(metrics))
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_write_artifacts_gathers_all_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_artifacts_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    keys = [ln.split(",")[0] for ln in (tmp_path / "submission.csv").read_text().splitlines()[1:]]
    assert keys == ["r0_a", "r0_b", "r0_c", "r1_a", "r1_b", "r1_c"]     # every valid row of both ranks
    m0, m1 = (json.loads((tmp_path / f"metrics{r}.json").read_text()) for r in (0, 1))
    assert m0 == m1 and 0.0 <= m0["gender_acc"] <= 1.0
