"""DCAL model: attention re-implementation, rollout, GLCA selection, PWCA, switches."""
from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch

from models.backbones import build_backbone
from models.dcal import (DCAL, DCALConfig, _qkv, block_forward, check_supported, pick_distractors, rollout,
                         select_top_tokens)
from tests.tolerance import (cosine_atol, network_atol, ops_rtol, rollout_atol, softmax_atol, sum_atol,
                             unit_roundoff)

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

def _block_reductions(dim: int = 192, tokens: int = 17, heads: int = 3, mlp_ratio: int = 4) -> list[int]:
    """The reductions one timm ViT block chains (tests/tolerance.py: network_atol): norm1 (mean,
    variance), qkv, q.k over the head dimension, softmax and attn @ v over the tokens, proj,
    norm2, fc1, fc2."""
    return [2 * dim, dim, dim // heads, tokens, tokens, dim, 2 * dim, dim, mlp_ratio * dim]


def _vit_reductions(blocks: int = 2, patch_fan_in: int = 3 * 8 * 8, tokens: int = 17) -> list[int]:
    """Patch embedding (a convolution of fan-in C * p * p), the blocks, the final norm."""
    return [patch_fan_in] + blocks * _block_reductions(tokens=tokens) + [2 * 192]


def _pwca_tol(model: DCAL, imgs: torch.Tensor) -> float:
    """PWCA with the image's own keys/values appended vs SA: one formula, two float32 paths (a
    softmax over 34 keys vs 17), each within network_atol of the exact SA branch."""
    return 2 * network_atol(_vit_reductions(tokens=34), _vit_scale(copy.deepcopy(model.vit).double(), imgs.double()))


def _block_bounds(blk64: torch.nn.Module, x64: torch.Tensor, dtype: torch.dtype,
                  tokens: int = 17) -> tuple[float, float]:
    """(output, attention) bounds of one block path against the exact block, from the float64 block:
    the output's scale is the largest |value| it carries; an attention probability errs by its
    softmax's own rounding plus half the error of its logits (the softmax Jacobian's rows sum
    to <= 1/2 in absolute value); a logit q.k * s errs by its chain norm1 -> qkv -> q.k (as in
    network_atol) relative to its sum of |terms|, which is <= |q| |k| s (Cauchy-Schwarz)."""
    h = blk64.norm1(x64)
    q, k, _ = _qkv(blk64.attn, h)
    out = block_forward(blk64, x64, need_weights=True)
    scale = max(float(x64.abs().amax()), float(out["x"].abs().amax()), float(h.abs().amax()))
    logit_terms = float((q.norm(dim=-1)[..., :, None] * k.norm(dim=-1)[..., None, :]).amax()) * blk64.attn.scale
    p = out["attn"]
    logit_range = float((p.amax(-1) / p.amin(-1)).log().amax())      # z_i - z_j = log(p_i / p_j)
    red = _block_reductions(tokens=tokens)
    attn = softmax_atol(red[3], logit_range, dtype) + 0.5 * network_atol(red[:3], logit_terms, dtype)
    return network_atol(red, max(scale, logit_terms), dtype), attn


def _check_block(vit: torch.nn.Module, vit64: torch.nn.Module, x: torch.Tensor) -> None:
    x64 = x.double()
    for blk, blk64 in zip(vit.blocks, vit64.blocks):
        atol, attn_atol = (2 * t for t in _block_bounds(blk64, x64, x.dtype))  # two paths, each within one bound
        ref = blk(x)                                             # timm (fused SDPA)
        fast = block_forward(blk, x)["x"]                        # our SDPA path
        slow = block_forward(blk, x, need_weights=True)          # our explicit-weights path
        assert torch.allclose(fast, ref, rtol=0, atol=atol)
        assert torch.allclose(slow["x"], ref, rtol=0, atol=atol)
        # timm's own unfused path: the attention entering attn_drop equals ours
        seen = {}
        hook = blk.attn.attn_drop.register_forward_hook(lambda m, i, o: seen.setdefault("a", i[0]))
        blk.attn.fused_attn = False
        ref2 = blk(x)
        blk.attn.fused_attn = True
        hook.remove()
        assert torch.allclose(slow["x"], ref2, rtol=0, atol=atol)
        assert torch.allclose(slow["attn"], seen["a"], rtol=0, atol=attn_atol)
        assert torch.allclose(slow["attn"].sum(-1), torch.ones(3, 3, 17, dtype=x.dtype), rtol=0, atol=attn_atol)
        x, x64 = ref, blk64(x64)


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "init_values": 0.1}], ids=["plain", "qknorm_layerscale"])
def test_block_reimplementation_matches_timm(kw):
    # Several kernel paths (fused SDPA, explicit softmax) of one formula: checked in float64 first,
    # where the bound (~1e-12) is far below what a wrong scale, head split or residual changes
    # (at init the attention logits are ~1e-2, so such a slip moves the output by ~1e-4 only);
    # float32 is then held to its own bound (tests/tolerance.py: network_atol, softmax_atol).
    torch.manual_seed(0)
    vit = _vit(**kw).eval()
    check_supported(vit)
    vit64 = copy.deepcopy(vit).double()
    x = torch.randn(3, 17, 192)
    with torch.no_grad():
        _check_block(vit64, vit64, x.double())
        _check_block(vit, vit64, x)


def test_sa_branch_matches_timm_forward():
    # The SA branch is our block re-implementation end to end: float64 (formula) and float32 (bound).
    torch.manual_seed(0)
    model = DCAL(num_classes=3, **TINY).eval()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model64 = copy.deepcopy(model).double()
        ref64 = model64.vit(imgs.double())
        scale = _vit_scale(model64.vit, imgs.double())
        assert torch.allclose(model64.branches(imgs.double())["sa"], ref64, rtol=0,
                              atol=2 * network_atol(_vit_reductions(), scale, torch.float64))
        tol32 = network_atol(_vit_reductions(), scale)
        assert torch.allclose(model.branches(imgs)["sa"].double(), ref64, rtol=0, atol=tol32)
        assert torch.allclose(model.vit(imgs).double(), ref64, rtol=0, atol=tol32)


def _vit_scale(vit: torch.nn.Module, imgs: torch.Tensor) -> float:
    """network_atol's scale for a ViT path, from its float64 run: the largest |value| the blocks
    carry and the largest attention-logit term sum |q| |k| s (Cauchy-Schwarz)."""
    largest = [float(imgs.abs().amax())]

    def seen(blk: torch.nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        q, k, _ = _qkv(blk.attn, blk.norm1(inputs[0]))
        logit_terms = (q.norm(dim=-1)[..., :, None] * k.norm(dim=-1)[..., None, :]).amax() * blk.attn.scale
        largest.extend([float(inputs[0].abs().amax()), float(out.abs().amax()), float(logit_terms)])

    hooks = [b.register_forward_hook(seen) for b in vit.blocks]
    with torch.no_grad():
        largest.append(float(vit(imgs).abs().amax()))          # after the final norm
    for h in hooks:
        h.remove()
    return max(largest)


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
    # float32 against decimals: the inputs' and the hand product's roundings (stochastic rows, so
    # every |term| sum is <= 1) are those of a 3-token, 2-layer rollout, plus the decimals' own
    tol = rollout_atol(3, 2) + unit_roundoff(torch.float32)
    assert torch.allclose(expected[0, 0], torch.tensor([0.425, 0.2, 0.375]), rtol=0, atol=tol)  # worked by hand
    r = rollout([a1, a2])
    assert torch.allclose(r, expected, rtol=0, atol=2 * tol)
    assert (r - s2).abs().amax() > 1e4 * tol                  # != the last layer alone
    assert torch.allclose(rollout([a1]), s1, rtol=0, atol=2 * tol)
    # random stacks (several heads, a batch): the written-out product, rows summing to 1
    torch.manual_seed(0)
    maps = [torch.randn(2, 4, 5, 5).mul(3).softmax(-1) for _ in range(3)]
    r = rollout(maps)
    assert r.shape == (2, 5, 5) and r.dtype == torch.float32
    tol = rollout_atol(5, 3, heads=4)                         # float32 against the float64 hand product
    assert torch.allclose(r.sum(-1), torch.ones(2, 5), rtol=0, atol=tol + sum_atol(5))
    hand = _hand_rollout([m.mean(1) for m in maps])           # float64 means of the same float32 maps
    assert torch.allclose(r.double(), hand, rtol=0, atol=tol)
    assert torch.allclose(rollout([m.mean(1) for m in maps]).double(), hand, rtol=0, atol=tol)  # head-averaged input
    assert (r.double() - _hand_rollout([m.mean(1) for m in maps[-1:]])).abs().amax() > 1e3 * tol
    # not normalised attention (rows not summing to 1) is re-normalised after adding I
    unnorm = torch.tensor([[[1.0, 1.0], [0.0, 2.0]]])
    assert torch.allclose(rollout([unnorm]).double(), torch.tensor([[[2 / 3, 1 / 3], [0.0, 1.0]]], dtype=torch.float64),
                          rtol=0, atol=rollout_atol(2, 1))


def test_rollout_averages_heads():
    # head 0: every token attends to token 1; head 1: to token 2. Mean over heads: 0.5 / 0.5.
    a = torch.zeros(1, 2, 3, 3)
    a[0, 0, :, 1] = 1.0
    a[0, 1, :, 2] = 1.0
    expected = torch.tensor([[[0.5, 0.25, 0.25], [0.0, 0.75, 0.25], [0.0, 0.25, 0.75]]])
    # every value is a dyadic fraction of a few bits, so float32 computes this rollout exactly
    assert torch.equal(rollout([a]), expected)                  # max over heads would give rows of 1/3
    assert torch.equal(rollout([a, a]), expected @ expected)


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
    # A formula check (which tokens, which pooling): in float64, where the two block paths agree
    # to ~1e-12; the rollout itself always runs in float32 (rollout_atol).
    torch.manual_seed(0)
    model = DCAL(num_classes=3, top_r=0.25, **TINY).eval()   # 4x4 grid -> R = 4
    with torch.no_grad():                                     # GLCA has its own weights
        for p in model.glca_block.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.double()
    x = torch.randn(2, 17, 192, dtype=torch.float64)
    R = 4
    with torch.no_grad():                                     # the block, then GLCA's two norms
        scale = max(float(x.abs().amax()), float(model.glca_block(x).abs().amax()))
    tol = 2 * network_atol(_block_reductions() + [2 * 192, 2 * 192], scale, torch.float64)

    def stack(seed: int) -> list[torch.Tensor]:              # peaky 2-layer head-averaged attention
        g = torch.Generator().manual_seed(seed)
        return [(4 * torch.randn(2, 17, 17, generator=g, dtype=torch.float64)).softmax(-1) for _ in range(2)]

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
        assert torch.allclose(g["rollout"].double(), _hand_rollout(maps), rtol=0, atol=rollout_atol(17, 2))
        assert torch.allclose(g["cls"], ref, rtol=0, atol=tol)
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
    # A formula check, so in float64 (the model paths agree to ~1e-12 there; rollout runs in float32).
    torch.manual_seed(0)
    model = DCAL(num_classes=3, top_r=0.25, **TINY).eval()
    with torch.no_grad():                                     # sharpen attention: distinct rankings
        for blk in model.vit.blocks:
            blk.attn.qkv.weight[:2 * 192] *= 8
    model.double()
    imgs = torch.randn(3, 3, 32, 32).double()
    # two float64 paths of the whole SA stack, each within network_atol (attention: the logits'
    # error at most, the softmax halving it), then GLCA's block and two norms
    tol = 2 * network_atol(_vit_reductions() + _block_reductions() + [2 * 192, 2 * 192], _vit_scale(model.vit, imgs),
                           torch.float64)
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
        # mean over heads, kept in float32 (a cast and a 3-head mean of values <= 1)
        assert torch.allclose(mine.double(), theirs, rtol=0, atol=tol + ops_rtol(3 + 1))
    assert torch.allclose(sa["x_in_last"], captured["x"], rtol=0, atol=tol)
    assert torch.allclose(amap.double(), _hand_rollout(mean_maps)[:, 0, 1:].reshape(3, 4, 4), rtol=0,
                          atol=rollout_atol(17, 2, heads=3) + 2 * tol)   # float32 rollout of float64 maps
    assert [set(i.tolist()) for i in br["glca_index"]] == top
    assert torch.allclose(br["glca"], ref, rtol=0, atol=tol)
    assert (br["glca"] - br["sa"]).abs().amax() > 1e-2        # not SA's class token


# ----------------------------------------------------------------------------- PWCA

def test_pwca_with_identical_distractor_equals_sa():
    torch.manual_seed(0)
    model = DCAL(num_classes=3, **TINY).train()           # PWCA is a training branch; no dropout configured
    imgs = torch.randn(4, 3, 32, 32)
    br = model.branches(imgs, distractor=torch.arange(4))
    tol = _pwca_tol(model, imgs)
    assert torch.allclose(br["pwca"], br["sa"], rtol=0, atol=tol)
    other = model.branches(imgs, distractor=torch.tensor([1, 0, 3, 2]))
    assert (other["pwca"] - other["sa"]).abs().amax() > 1e2 * tol   # another image's keys do change it
    # block level: concatenating a copy of the own keys/values changes nothing
    vit = model.vit
    x = torch.randn(2, 17, 192)
    o = block_forward(vit.blocks[0], x, return_kv=True)
    dup = block_forward(vit.blocks[0], x, extra_kv=(o["k"], o["v"]), need_weights=True)
    block_tol = 2 * _block_bounds(copy.deepcopy(vit.blocks[0]).double(), x.double(), torch.float32,
                                 tokens=34)[0]
    assert torch.allclose(dup["x"], o["x"], rtol=0, atol=block_tol) and dup["attn"].shape[-1] == 34


def _hand_pwca(model: DCAL, imgs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """PWCA written out from the paper (float64): image i's state ``y`` gives the queries; keys and
    values are ``[K_i; K_j]``, ``[V_i; V_j]`` (``K_j, V_j`` from the distractor j's SA state at the same
    depth, timm's own block forward) under ONE softmax over both images' tokens; then timm's
    residual/MLP; the class token through the final norms."""
    vit = model.vit
    x0 = vit.norm_pre(vit._pos_embed(vit.patch_embed(imgs)))
    sa_states = [x0]
    for blk in vit.blocks:
        sa_states.append(blk(sa_states[-1]))
    y = x0
    for blk, s in zip(vit.blocks, sa_states):
        a = blk.attn
        B, N, C = y.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, -1, a.num_heads, a.head_dim).transpose(1, 2)

        q, k_i, v_i = (heads(t) for t in a.qkv(blk.norm1(y)).chunk(3, dim=-1))
        _, k_j, v_j = (heads(t) for t in a.qkv(blk.norm1(s[d])).chunk(3, dim=-1))
        k, v = torch.cat([k_i, k_j], dim=2), torch.cat([v_i, v_j], dim=2)
        p = torch.softmax(q @ k.transpose(-2, -1) * a.scale, dim=-1)       # one softmax over 2N keys
        y = y + a.proj((p @ v).transpose(1, 2).reshape(B, N, C))
        y = y + blk.mlp(blk.norm2(y))
    return vit.fc_norm(vit.norm(y)[:, 0])


def test_pwca_is_one_softmax_over_both_images_with_own_queries():
    """The PWCA branch against the formula written out: a wrong version (values of the own image
    only, two softmaxes averaged, queries from the distractor) moves the class token by O(0.1),
    far beyond float32's bound."""
    torch.manual_seed(0)
    model = DCAL(num_classes=3, **TINY).train()
    imgs = torch.randn(4, 3, 32, 32)
    d = torch.tensor([1, 0, 3, 2])
    with torch.no_grad():
        got = model.branches(imgs, distractor=d)["pwca"].double()
        model64 = copy.deepcopy(model).double()
        ref = _hand_pwca(model64, imgs.double(), d)
        sa = model64.vit(imgs.double())
    tol = _pwca_tol(model, imgs)
    assert torch.allclose(got, ref, rtol=0, atol=tol)
    assert (ref - sa).abs().amax() > 1e2 * tol                  # the distractor matters at this scale


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
    # rel=1e-5 is for the central difference's truncation (eps^2 / 6 times the third derivative,
    # eps = 1e-4), not for rounding: float64 rounding adds only ~u |f| / eps ~ 1e-12 relative
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
    assert torch.allclose(br["pwca"], br["sa"], rtol=0, atol=_pwca_tol(model, imgs))
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
    # the mean of two 3-class softmaxes of margin-head logits s cos, whose spread is <= 2 s; the
    # mean's sum and halving add 2 roundings
    logit_range = 2 * model.cfg.margin_s
    assert torch.allclose(ev["identity_probs"].sum(1), torch.ones(6), rtol=0,
                          atol=softmax_atol(3, logit_range) + ops_rtol(2))


@pytest.mark.parametrize("metric,head", [("supcon", "cosface"), ("none", "linear")])
def test_other_losses_and_static_weights(metric, head):
    model = DCAL(num_classes=3, metric_loss=metric, head=head, dynamic_weights=False, **TINY).train()
    out = model(_batch())
    assert torch.isfinite(out["loss"])
    terms = [v.item() for v in out["terms"].values()]
    assert out["loss"].item() == pytest.approx(sum(terms), rel=0, abs=sum_atol(len(terms), sum(map(abs, terms))))
    out["loss"].backward()


def test_embed_and_score():
    torch.manual_seed(0)
    model = DCAL(num_classes=3, **TINY).eval()
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        e = model.embed(imgs)
        br = model.branches(imgs)
    assert e.shape == (3, 384)
    # two normalised 192-halves (sum of squares, sqrt, divide), then the 384-norm: relative chains
    assert torch.allclose(e.norm(dim=1), torch.full((3,), 2 ** 0.5), rtol=0, atol=2 ** 0.5 * ops_rtol(195 + 386))
    s = model.score(e, e.flip(0))
    ref = 0.5 * (torch.cosine_similarity(br["sa"], br["sa"].flip(0)) +
                 torch.cosine_similarity(br["glca"], br["glca"].flip(0)))
    # a 384-cosine of unit halves vs the mean of two 192-cosines; the halves' normalisation adds its own
    tol = cosine_atol(384) + cosine_atol(192) + ops_rtol(195)
    assert torch.allclose(s, ref, rtol=0, atol=tol)
    assert torch.allclose(model.score(e, e), torch.ones(3), rtol=0, atol=tol)


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


def test_cnn_without_attention_shape_and_other_families_are_refused_with_the_options():
    # A CNN gets attention blocks on its feature map (models/cnn_tokens.py), whose shape it must name.
    for name in ("resnet18", "convnext_atto"):
        with pytest.raises(ValueError, match="attention_dim") as err:
            DCAL(num_classes=3, backbone=name, img_size=32)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="has no timm ViT Block/Attention layers") as err:
        DCAL(num_classes=3, backbone="swin_tiny_patch4_window7_224", img_size=32)
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
