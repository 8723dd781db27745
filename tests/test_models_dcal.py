"""DCAL model: attention re-implementation, rollout, GLCA selection, PWCA, switches."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch

from models.backbones import build_backbone
from models.dcal import (DCAL, DCALConfig, block_forward, check_supported, pick_distractors, rollout,
                         select_top_tokens)

TINY = dict(backbone="vit_tiny_patch16_224", img_size=32, backbone_kwargs=dict(patch_size=8, depth=2))


def _batch(B: int = 6, size: int = 32) -> dict:
    torch.manual_seed(0)
    return {"image": torch.randn(B, 3, size, size), "identity": torch.tensor([0, 0, 1, 1, 2, 2])[:B],
            "twin": torch.tensor([1, 1, 0, 0, -1, -1])[:B]}


def _vit(**kw):
    args = dict(img_size=32, patch_size=8, depth=2, num_classes=0)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args)


# ----------------------------------------------------------------------------- attention re-implementation

@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "init_values": 0.1}], ids=["plain", "qknorm_layerscale"])
def test_block_reimplementation_matches_timm(kw):
    torch.manual_seed(0)
    vit = _vit(**kw).eval()
    check_supported(vit)
    x = torch.randn(3, 17, 192)
    for blk in vit.blocks:
        ref = blk(x)                                             # timm (fused SDPA)
        fast = block_forward(blk, x)["x"]                        # our SDPA path
        slow = block_forward(blk, x, need_weights=True)          # our explicit-weights path
        assert torch.allclose(fast, ref, atol=1e-5)
        assert torch.allclose(slow["x"], ref, atol=1e-5)
        # timm's own unfused path: the attention entering attn_drop equals ours
        seen = {}
        hook = blk.attn.attn_drop.register_forward_hook(lambda m, i, o: seen.setdefault("a", i[0]))
        blk.attn.fused_attn = False
        ref2 = blk(x)
        blk.attn.fused_attn = True
        hook.remove()
        assert torch.allclose(slow["x"], ref2, atol=1e-6)
        assert torch.allclose(slow["attn"], seen["a"], atol=1e-6)
        assert torch.allclose(slow["attn"].sum(-1), torch.ones(3, 3, 17), atol=1e-5)
        x = ref


def test_sa_branch_matches_timm_forward():
    torch.manual_seed(0)
    model = DCAL(num_classes=3, **TINY).eval()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.branches(imgs)["sa"], model.vit(imgs), atol=1e-5)


# ----------------------------------------------------------------------------- rollout / selection

def test_rollout_rows_sum_to_one_and_formula():
    torch.manual_seed(0)
    maps = [torch.randn(2, 4, 5, 5).softmax(-1) for _ in range(3)]
    r = rollout(maps)
    assert r.shape == (2, 5, 5)
    assert torch.allclose(r.sum(-1), torch.ones(2, 5), atol=1e-6)
    bar = [0.5 * m.mean(1) + 0.5 * torch.eye(5) for m in maps]
    assert torch.allclose(r, bar[2] @ bar[1] @ bar[0], atol=1e-6)
    model = DCAL(num_classes=3, **TINY).eval()
    amap = model.attention_rollout(torch.randn(2, 3, 32, 32))
    assert amap.shape == (2, 4, 4) and (amap >= 0).all() and (amap.sum((1, 2)) <= 1 + 1e-6).all()


def test_top_r_selects_highest_scoring_patches():
    r = torch.zeros(2, 11, 11)
    r[0, 0] = torch.tensor([0.9, 0.1, 0.5, 0.0, 0.3, 0.05, 0.8, 0.2, 0.0, 0.0, 0.4])   # CLS score is ignored
    r[1, 0] = torch.arange(11, dtype=torch.float)
    idx = select_top_tokens(r, 0.3, num_prefix_tokens=1)                    # 10 patches -> R = 3
    assert idx.shape == (2, 4)
    assert idx[0].tolist() == [0, 6, 2, 10] and idx[1].tolist() == [0, 10, 9, 8]
    assert select_top_tokens(r, 0.01).shape == (2, 2)                       # at least one patch
    assert select_top_tokens(r, 1.0).shape == (2, 11)


def test_glca_at_init_equals_last_block_on_cls():
    # GLCA is a copy of the last SA block fed the same input; the CLS query sees all keys,
    # so at initialisation its class token equals SA's.
    torch.manual_seed(0)
    model = DCAL(num_classes=3, top_r=0.3, **TINY).eval()
    with torch.no_grad():
        br = model.branches(torch.randn(3, 3, 32, 32))
    assert br["glca_index"].shape == (3, 1 + 5) and (br["glca_index"][:, 0] == 0).all()
    assert torch.allclose(br["glca"], br["sa"], atol=1e-5)


# ----------------------------------------------------------------------------- PWCA

def test_pwca_with_identical_distractor_equals_sa():
    torch.manual_seed(0)
    model = DCAL(num_classes=3, **TINY).train()           # PWCA is a training branch; no dropout configured
    imgs = torch.randn(4, 3, 32, 32)
    br = model.branches(imgs, distractor=torch.arange(4))
    assert torch.allclose(br["pwca"], br["sa"], atol=1e-5)
    other = model.branches(imgs, distractor=torch.tensor([1, 0, 3, 2]))
    assert not torch.allclose(other["pwca"], other["sa"], atol=1e-3)
    # block level: concatenating a copy of the own keys/values changes nothing
    vit = model.vit
    x = torch.randn(2, 17, 192)
    o = block_forward(vit.blocks[0], x, return_kv=True)
    dup = block_forward(vit.blocks[0], x, extra_kv=(o["k"], o["v"]), need_weights=True)
    assert torch.allclose(dup["x"], o["x"], atol=1e-5) and dup["attn"].shape[-1] == 34


def test_pick_distractors():
    ident = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    twin = torch.tensor([1, 1, 0, 0, -1, -1, -1])
    for seed in range(5):
        d = pick_distractors(ident, twin, generator=torch.Generator().manual_seed(seed))
        assert set(ident[d[:2]].tolist()) == {1} and set(ident[d[2:4]].tolist()) == {0}  # co-twins
        assert (ident[d[4:]] != ident[4:]).all()                                         # another identity
    same = pick_distractors(torch.tensor([5, 5, 5]))
    assert (same != torch.arange(3)).all()                    # no other identity: another image
    assert pick_distractors(torch.tensor([1])).tolist() == [0]


# ----------------------------------------------------------------------------- training / inference

@pytest.mark.parametrize("glca,pwca", [(True, True), (True, False), (False, True), (False, False)])
def test_forward_backward_all_switches(glca, pwca):
    torch.manual_seed(0)
    model = DCAL(num_classes=3, use_glca=glca, use_pwca=pwca, verification_head=glca, **TINY).train()
    out = model(_batch())
    expected = {"sa", "metric"} | ({"glca"} if glca else set()) | ({"pwca"} if pwca else set()) \
        | ({"verif"} if glca else set())
    assert set(out["terms"]) == expected
    assert torch.isfinite(out["loss"]) and all(torch.isfinite(v) for v in out["terms"].values())
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert model.loss_weights.log_vars.grad.abs().sum() > 0
    assert out["embedding"].shape == (6, 384 if glca else 192)
    model.eval()
    with torch.no_grad():
        ev = model(_batch())
    assert "pwca_logits" not in ev and torch.isfinite(ev["loss"])
    with torch.no_grad():                                     # unseen identities: ignored in eval ...
        assert torch.isfinite(model(dict(_batch(), identity=torch.tensor([7, 8, 9, 9, 2, 2])))["loss"])
    model.train()
    with pytest.raises(ValueError, match="out of range"):    # ... but a config error in training
        model(dict(_batch(), identity=torch.tensor([7, 8, 9, 9, 2, 2])))
    assert torch.allclose(ev["identity_probs"].sum(1), torch.ones(6), atol=1e-5)


@pytest.mark.parametrize("metric,head", [("supcon", "cosface"), ("none", "linear")])
def test_other_losses_and_static_weights(metric, head):
    model = DCAL(num_classes=3, metric_loss=metric, head=head, dynamic_weights=False, **TINY).train()
    out = model(_batch())
    assert torch.isfinite(out["loss"])
    assert out["loss"].item() == pytest.approx(sum(v.item() for v in out["terms"].values()), rel=1e-5)
    out["loss"].backward()


def test_embed_and_score():
    torch.manual_seed(0)
    model = DCAL(num_classes=3, **TINY).eval()
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        e = model.embed(imgs)
        br = model.branches(imgs)
    assert e.shape == (3, 384)
    assert torch.allclose(e.norm(dim=1), torch.full((3,), 2 ** 0.5), atol=1e-5)
    s = model.score(e, e.flip(0))
    ref = 0.5 * (torch.cosine_similarity(br["sa"], br["sa"].flip(0)) +
                 torch.cosine_similarity(br["glca"], br["glca"].flip(0)))
    assert torch.allclose(s, ref, atol=1e-5)
    assert torch.allclose(model.score(e, e), torch.ones(3), atol=1e-5)


def test_hybrid_resnet_vit_backbone():
    model = DCAL(num_classes=3, backbone="vit_small_r26_s32_224", img_size=64,
                 backbone_kwargs=dict(depth=1)).train()
    out = model(_batch(size=64))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert model.attention_rollout(torch.randn(1, 3, 64, 64)).shape == (1, 2, 2)


def test_local_weights_and_unsupported_backbones(tmp_path):
    src = _vit()
    path = tmp_path / "vit.pth"
    torch.save({"model": src.state_dict()}, path)
    model = DCAL(num_classes=3, weights_path=str(path), **TINY)
    assert torch.equal(model.vit.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert torch.equal(model.glca_block.attn.qkv.weight, src.blocks[1].attn.qkv.weight)   # GLCA = copy of last
    assert model.glca_block.attn.qkv.weight.data_ptr() != model.vit.blocks[1].attn.qkv.weight.data_ptr()
    with pytest.raises(TypeError):
        DCAL(num_classes=3, backbone_module=build_backbone("resnet18")[0])
    with pytest.raises(ValueError):
        DCALConfig(top_r=0.0)
    with pytest.raises(ValueError):
        DCAL(num_classes=0, **TINY)


def test_verification_metrics():
    import math

    from models.verification import verification_metrics

    perfect = verification_metrics([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0])
    assert perfect["auc"] == 1.0 and perfect["eer"] == 0.0 and perfect["best_acc"] == 1.0
    assert perfect["tar_at_far_0.01"] == 1.0
    mixed = verification_metrics([0.9, 0.3, 0.6, 0.1], [1, 1, 0, 0])   # one swapped pair
    assert mixed["auc"] == pytest.approx(0.75) and mixed["best_acc"] == pytest.approx(0.75)
    assert mixed["eer"] == pytest.approx(0.5)
    assert math.isnan(verification_metrics([0.5, 0.4], [1, 1])["auc"])
