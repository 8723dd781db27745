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

def _hand_rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """Abnar & Zuidema rollout written out: ``S_l = (0.5 A_l + 0.5 I)`` row-normalised,
    ``S_L @ ... @ S_1``, each matrix product as an explicit sum (float64)."""
    result = None
    for a in maps:
        a = a.double()
        n = a.shape[-1]
        s = 0.5 * a + 0.5 * torch.eye(n, dtype=torch.float64)
        s = s / s.sum(-1, keepdim=True)
        if result is None:
            result = s
        else:
            result = torch.stack([torch.stack([sum(s[..., i, k] * result[..., k, j] for k in range(n))
                                               for j in range(n)], -1) for i in range(n)], -2)
    return result


def _top(r: torch.Tensor, R: int, prefix: int = 1) -> tuple[list[set[int]], float]:
    """The top-``R`` patch tokens of the CLS row of ``r`` (as sets) and the smallest
    score gap between the R-th and (R+1)-th token (how robust the ranking is)."""
    vals, idx = r[:, 0, prefix:].sort(dim=1, descending=True)
    return [set((row[:R] + prefix).tolist()) for row in idx], float((vals[:, R - 1] - vals[:, R]).min())


def test_rollout_accumulates_every_layer_with_residual():
    # A known 3-token, 2-layer stack (one head): the product over both layers, not the last layer alone.
    a1 = torch.tensor([[[0.2, 0.8, 0.0], [0.1, 0.1, 0.8], [0.5, 0.0, 0.5]]])
    a2 = torch.tensor([[[0.0, 0.0, 1.0], [0.3, 0.3, 0.4], [0.6, 0.2, 0.2]]])
    s1 = 0.5 * a1 + 0.5 * torch.eye(3)                        # rows already sum to 1
    s2 = 0.5 * a2 + 0.5 * torch.eye(3)
    expected = torch.tensor([[[s2[0, i, 0] * s1[0, 0, j] + s2[0, i, 1] * s1[0, 1, j] + s2[0, i, 2] * s1[0, 2, j]
                               for j in range(3)] for i in range(3)]])
    assert torch.allclose(expected[0, 0], torch.tensor([0.425, 0.2, 0.375]))  # worked by hand
    r = rollout([a1, a2])
    assert torch.allclose(r, expected, atol=1e-6)
    assert not torch.allclose(r, s2, atol=1e-2)               # != the last layer alone
    assert torch.allclose(rollout([a1]), s1, atol=1e-6)
    # random stacks (several heads, a batch): the written-out product, rows summing to 1
    torch.manual_seed(0)
    maps = [torch.randn(2, 4, 5, 5).mul(3).softmax(-1) for _ in range(3)]
    r = rollout(maps)
    assert r.shape == (2, 5, 5) and r.dtype == torch.float32
    assert torch.allclose(r.sum(-1), torch.ones(2, 5), atol=1e-6)
    assert torch.allclose(r.double(), _hand_rollout([m.mean(1) for m in maps]), atol=1e-6)
    assert torch.allclose(rollout([m.mean(1) for m in maps]), r, atol=1e-6)   # head-averaged input
    assert not torch.allclose(r.double(), _hand_rollout([m.mean(1) for m in maps[-1:]]), atol=1e-3)
    # not normalised attention (rows not summing to 1) is re-normalised after adding I
    unnorm = torch.tensor([[[1.0, 1.0], [0.0, 2.0]]])
    assert torch.allclose(rollout([unnorm]), torch.tensor([[[2 / 3, 1 / 3], [0.0, 1.0]]]), atol=1e-6)


def test_rollout_averages_heads():
    # head 0: every token attends to token 1; head 1: to token 2. Mean over heads: 0.5 / 0.5.
    a = torch.zeros(1, 2, 3, 3)
    a[0, 0, :, 1] = 1.0
    a[0, 1, :, 2] = 1.0
    expected = torch.tensor([[[0.5, 0.25, 0.25], [0.0, 0.75, 0.25], [0.0, 0.25, 0.75]]])
    assert torch.allclose(rollout([a]), expected, atol=1e-6)   # max over heads would give rows of 1/3
    assert torch.allclose(rollout([a, a]), expected @ expected, atol=1e-6)


def test_top_r_selects_highest_scoring_patches():
    r = torch.zeros(2, 11, 11)
    r[0, 0] = torch.tensor([0.9, 0.1, 0.5, 0.0, 0.3, 0.05, 0.8, 0.2, 0.0, 0.0, 0.4])   # CLS score is ignored
    r[1, 0] = torch.arange(11, dtype=torch.float)
    idx = select_top_tokens(r, 0.3, num_prefix_tokens=1)                    # 10 patches -> R = 3
    assert idx.shape == (2, 4)
    assert idx[0].tolist() == [0, 6, 2, 10] and idx[1].tolist() == [0, 10, 9, 8]
    assert select_top_tokens(r, 0.3, include_cls=False).tolist() == [[6, 2, 10], [10, 9, 8]]
    assert select_top_tokens(r, 0.01).shape == (2, 2)                       # at least one patch
    assert select_top_tokens(r, 1.0).shape == (2, 11)
    r[0, 0, 1] = 5.0                                                        # best, but a register token:
    assert select_top_tokens(r, 0.3, num_prefix_tokens=2, include_cls=False)[0].tolist() == [6, 2, 10]
    assert select_top_tokens(r, 0.3, num_prefix_tokens=1, include_cls=False)[0].tolist() == [1, 6, 2]


def _glca_by_hand(model: DCAL, x_in_last: torch.Tensor, top: list[set[int]]) -> torch.Tensor:
    """GLCA embedding from timm's own block forward: the GLCA block over all tokens
    (a token's output depends only on its own query), the outputs of exactly the
    selected tokens mean-pooled, then the GLCA norms."""
    full = model.glca_block(x_in_last)
    pooled = torch.stack([full[b, sorted(t)].mean(0) for b, t in enumerate(top)])
    return model.glca_fc_norm(model.glca_norm(pooled))


def test_glca_pools_exactly_the_top_r_tokens_of_the_rollout():
    torch.manual_seed(0)
    model = DCAL(num_classes=3, top_r=0.25, **TINY).eval()   # 4x4 grid -> R = 4
    with torch.no_grad():                                     # GLCA has its own weights
        for p in model.glca_block.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 17, 192)
    R = 4

    def stack(seed: int) -> list[torch.Tensor]:              # peaky 2-layer head-averaged attention
        g = torch.Generator().manual_seed(seed)
        return [(4 * torch.randn(2, 17, 17, generator=g)).softmax(-1) for _ in range(2)]

    outs = []
    for seed in (0, 4):
        maps = stack(seed)
        top, gap = _top(_hand_rollout(maps), R)
        # the stack discriminates: the accumulated ranking is neither the last layer's, nor the first R patches
        assert gap > 1e-3
        assert all(t != tl for t, tl in zip(top, _top(_hand_rollout(maps[-1:]), R)[0]))
        assert all(t != set(range(1, R + 1)) for t in top)
        with torch.no_grad():
            g = model.forward_glca(x, maps)
            ref = _glca_by_hand(model, x, top)
        assert g["index"].shape == (2, R) and [set(i.tolist()) for i in g["index"]] == top
        assert torch.allclose(g["rollout"].double(), _hand_rollout(maps), atol=1e-6)
        assert torch.allclose(g["cls"], ref, atol=1e-5)
        with torch.no_grad():                                 # not the pooling of all / CLS / other tokens
            others = [_glca_by_hand(model, x, [set(range(1, 17))] * 2),
                      model.glca_fc_norm(model.glca_norm(model.glca_block(x)[:, 0])),
                      _glca_by_hand(model, x, [set(range(1, R + 1))] * 2)]
        for o in others:
            assert (g["cls"] - o).abs().amax(1).min() > 1e-2
        outs.append(g["cls"])
    assert (outs[0] - outs[1]).abs().amax(1).min() > 1e-2      # another ranking, another GLCA embedding


def test_glca_end_to_end_matches_hand_computation():
    # Through DCAL.branches: the head-averaged attention of every SA block (captured from
    # timm's own unfused attention), rolled out by hand, picks the tokens GLCA pools.
    torch.manual_seed(0)
    model = DCAL(num_classes=3, top_r=0.25, **TINY).eval()
    with torch.no_grad():                                     # sharpen attention: distinct rankings
        for blk in model.vit.blocks:
            blk.attn.qkv.weight[:2 * 192] *= 8
    imgs = torch.randn(3, 3, 32, 32)
    seen: list[torch.Tensor] = []
    captured: dict[str, torch.Tensor] = {}
    hooks = [b.attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
             for b in model.vit.blocks]
    hooks.append(model.vit.blocks[-1].register_forward_pre_hook(lambda m, i: captured.setdefault("x", i[0])))
    for b in model.vit.blocks:
        b.attn.fused_attn = False
    with torch.no_grad():
        model.vit.forward_features(imgs)
    for h in hooks:
        h.remove()
    assert len(seen) == 2 and seen[0].shape == (3, 3, 17, 17)           # [B, heads, N, N]
    mean_maps = [a.mean(1) for a in seen]
    R = 4
    top, gap = _top(_hand_rollout(mean_maps), R)
    assert gap > 1e-3
    assert all(t != tl for t, tl in zip(top, _top(_hand_rollout(mean_maps[-1:]), R)[0]))       # last layer only
    assert any(t != tm for t, tm in zip(top, _top(_hand_rollout([a.amax(1) for a in seen]), R)[0]))  # max heads
    with torch.no_grad():
        sa = model.forward_sa(imgs, need_weights=True)
        br = model.branches(imgs)
        ref = _glca_by_hand(model, captured["x"], top)
        amap = model.attention_rollout(imgs)
    assert len(sa["attn"]) == 2
    for mine, theirs in zip(sa["attn"], mean_maps):
        assert torch.allclose(mine, theirs, atol=1e-6)       # mean over heads
    assert torch.allclose(sa["x_in_last"], captured["x"], atol=1e-5)
    assert torch.allclose(amap.double(), _hand_rollout(mean_maps)[:, 0, 1:].reshape(3, 4, 4), atol=1e-6)
    assert [set(i.tolist()) for i in br["glca_index"]] == top
    assert torch.allclose(br["glca"], ref, atol=1e-5)
    assert not torch.allclose(br["glca"], br["sa"], atol=1e-2)   # not SA's class token


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


def test_pwca_gradient_flows_into_the_distractor():
    # The distractor's keys/values are not detached: d PWCA(i) / d image_j is the full derivative
    # (checked against central finite differences, float64).
    torch.manual_seed(0)
    model = DCAL(num_classes=3, **TINY).double().train()
    imgs = torch.randn(4, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    distractor = torch.tensor([1, 0, 3, 2])
    w = torch.randn(192, dtype=torch.float64)
    (model.branches(imgs, distractor=distractor)["pwca"][0] @ w).backward()
    g = imgs.grad
    assert g[1].abs().sum() > 0                               # the distractor of sample 0
    assert g[2:].abs().sum() == 0                             # nothing else
    v = torch.randn(3, 32, 32, dtype=torch.float64)
    eps = 1e-4

    def f(t: float) -> float:
        with torch.no_grad():
            x = imgs.detach().clone()
            x[1] += t * v
            return float(model.branches(x, distractor=distractor)["pwca"][0] @ w)

    fd = (f(eps) - f(-eps)) / (2 * eps)
    assert abs(fd) > 1e-6
    assert float((g[1] * v).sum()) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_pwca_shares_the_sa_blocks():
    torch.manual_seed(0)
    with_pwca = DCAL(num_classes=3, **TINY)
    without = DCAL(num_classes=3, use_pwca=False, **TINY)
    names = lambda m: {n for n, _ in m.named_parameters() if not n.startswith("loss_weights")}  # noqa: E731
    assert names(with_pwca) == names(without)                 # no parameters of its own
    model = with_pwca.train()
    with torch.no_grad():                                     # "train" SA: a copy made at init would go stale
        for p in model.vit.blocks.parameters():
            p.add_(0.05 * torch.randn_like(p))
    imgs = torch.randn(4, 3, 32, 32)
    br = model.branches(imgs, distractor=torch.arange(4))
    assert torch.allclose(br["pwca"], br["sa"], atol=1e-5)
    # the PWCA output reaches the SA blocks' own tensors (the last MLP feeds no key/value)
    model.zero_grad()
    model.branches(imgs, distractor=torch.tensor([1, 0, 3, 2]))["pwca"].square().sum().backward()
    last = model.vit.blocks[-1]
    for p in (last.mlp.fc2.weight, last.attn.proj.weight, model.vit.blocks[0].mlp.fc1.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


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
    with torch.no_grad():                                     # unseen identities: ignored in eval
        assert torch.isfinite(model(dict(_batch(), identity=torch.tensor([7, 8, 9, 9, 2, 2])))["loss"])
    # (in training, the data path refuses a label the classifier lacks: tests/recipes/test_labels.py)
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


def test_pure_cnn_backbone_is_refused_with_the_options():
    # Before: DCAL(backbone="resnet18") built the CNN and raised TypeError from check_supported.
    for name in ("resnet18", "convnext_atto"):
        with pytest.raises(ValueError, match="has no timm ViT Block/Attention layers") as err:
            DCAL(num_classes=3, backbone=name, img_size=32)
        message = str(err.value)
        assert "\n" not in message and "vit_small_r26_s32_224" in message and "conv_stem" in message
    with pytest.raises(ValueError, match="not a timm model"):
        DCAL(num_classes=3, backbone="resnet_does_not_exist", img_size=32)


def test_hybrid_resnet_vit_tokens_come_from_the_resnet_stem():
    from timm.layers import HybridEmbed

    model = DCAL(num_classes=3, backbone="vit_small_r26_s32_224", img_size=64,
                 backbone_kwargs=dict(depth=1)).eval()
    assert isinstance(model.vit.patch_embed, HybridEmbed)
    assert "ResNet" in type(model.vit.patch_embed.backbone).__name__
    # stride 32: a 2x2 token grid at 64 px, and the rollout covers exactly that grid
    assert model.attention_rollout(torch.randn(2, 3, 64, 64)).shape == (2, 2, 2)
    assert model.embed(torch.randn(2, 3, 64, 64)).shape == (2, 2 * model.vit.embed_dim)
