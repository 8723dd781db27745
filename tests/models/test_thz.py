"""THz networks, losses and augmentations (models/thz.py, models/thz_augment.py,
the reconstruction / distillation parts of models/losses.py), each against a
direct computation or the property it promises."""
from __future__ import annotations

import math
import socket
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.losses import (LpipsWeightsMissing, ReconstructionLoss, SupConLoss, build_lpips, charbonnier_loss,
                           feature_distill_loss, kd_logit_loss, lpips_distance, lpips_weights_file, psnr,
                           relation_distill_loss, similarity_kd_loss, ssim_index, ssim_window)
from models.thz import (CustomResNetEncoder, DualCrossAttention, MoEUNetDecoder, ThzMtlNet, ThzNetConfig,
                        ThzTeacherNet, TimmEncoder)
from models.thz_augment import PROFILES, ThzAugment
from tests.tolerance import (cosine_atol, logsumexp_atol, module_atol, ops_rtol, softmax_atol, ssim_atol, sum_atol,
                             unit_roundoff)

TINY = ThzNetConfig(width=4, depth=2, embedding_dim=16, projection_dim=8, projection_hidden=16)


# ----------------------------------------------------------------------------- losses

def test_charbonnier_matches_the_formula():
    pred = torch.tensor([[0.0, 0.5], [1.0, 0.25]])
    target = torch.tensor([[0.0, 0.2], [0.6, 0.25]])
    eps = 1e-3
    d = [0.0, 0.3, 0.4, 0.0]
    expected = sum(math.sqrt(x * x + eps * eps) for x in d) / 4
    # float32 against decimals: the inputs' roundings reach d with a factor (|p| + |t|) / |d| <= 4,
    # then d * d + eps^2 and sqrt (3 operations, eps^2 rounded: 1), the sum of 4 positives (3), /4 exact
    assert charbonnier_loss(pred, target, eps).item() == pytest.approx(expected, rel=ops_rtol(4 + 4 + 3), abs=0)


def _gauss_ssim(x: np.ndarray, y: np.ndarray, win: int, sigma: float = 1.5, data_range: float = 1.0) -> float:
    """SSIM written out (Wang et al. 2004): Gaussian-weighted local statistics over
    every full window position ("valid"), C1 = (0.01 L)^2, C2 = (0.03 L)^2, mean map."""
    g = np.exp(-((np.arange(win) - win // 2) ** 2) / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    H, W = x.shape
    vals = []
    for i in range(H - win + 1):
        for j in range(W - win + 1):
            a, b = x[i:i + win, j:j + win], y[i:i + win, j:j + win]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * a * a).sum() - ma ** 2, (w * b * b).sum() - mb ** 2
            cov = (w * a * b).sum() - ma * mb
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_wrapper_against_a_direct_computation_and_constant_images():
    # The formula is checked in float64 (the wrapper computes in float64 when given it), where
    # the bound is ~1e-10 and a wrong constant, window or data range is far outside it; float32
    # is then held to its own derived bound against float64. Flat images are the worst case:
    # sigma^2 = E[x^2] - mu^2 cancels to rounding noise that C2 = 9e-4 divides (tests/tolerance.py).
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 14, 14, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.rand(2, 1, 14, 14, generator=g, dtype=torch.float64)).clamp(0, 1)
    win = ssim_window(14, 14)
    tol64, tol32 = ssim_atol(win, dtype=torch.float64), ssim_atol(win, dtype=torch.float32)
    per = ssim_index(x, y, per_sample=True)
    assert per.shape == (2,) and per.dtype == torch.float64
    for b in range(2):
        direct = _gauss_ssim(x[b, 0].numpy(), y[b, 0].numpy(), win=win)
        assert per[b].item() == pytest.approx(direct, rel=0, abs=tol64)
    assert ssim_index(x, y).item() == pytest.approx(per.mean().item(), rel=0, abs=tol64)
    assert torch.allclose(ssim_index(x.float(), y.float(), per_sample=True).double(), per, rtol=0, atol=tol32)
    # constant images: no variance, SSIM = luminance term (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.3, 0.7, 0.01 ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    flat_a, flat_b = torch.full((1, 1, 16, 16), a, dtype=torch.float64), torch.full((1, 1, 16, 16), b, dtype=torch.float64)
    flat_tol64, flat_tol32 = ssim_atol(ssim_window(16, 16), dtype=torch.float64), ssim_atol(ssim_window(16, 16))
    assert ssim_index(flat_a, flat_b).item() == pytest.approx(expected, rel=0, abs=flat_tol64)
    assert ssim_index(flat_a.float(), flat_b.float()).item() == pytest.approx(expected, rel=0, abs=flat_tol32)
    assert ssim_index(x, x).item() == pytest.approx(1.0, rel=0, abs=tol64)
    assert ssim_index(x.float(), x.float()).item() == pytest.approx(1.0, rel=0, abs=tol32)
    # data_range matters: the same images on a 0..255 scale give the same SSIM (C1, C2 scale with L^2)
    assert ssim_index(x * 255, y * 255, data_range=255.0).item() == pytest.approx(ssim_index(x, y).item(), rel=0,
                                                                                  abs=2 * tol64)
    assert abs(ssim_index(x * 255, y * 255, data_range=1.0).item() - ssim_index(x, y).item()) > 100 * tol64


def test_ssim_tolerances_catch_wrong_constants():
    """The float64 bound is tight enough to tell the right SSIM from plausible wrong ones."""
    a, b = 0.3, 0.7
    right = (2 * a * b + 0.01 ** 2) / (a * a + b * b + 0.01 ** 2)
    for wrong_c1 in (0.01, 0.03 ** 2, 0.0):
        wrong = (2 * a * b + wrong_c1) / (a * a + b * b + wrong_c1)
        assert abs(wrong - right) > 1e3 * ssim_atol(11, dtype=torch.float64)
    assert ssim_atol(11, dtype=torch.float64) < 1e-9 < ssim_atol(11, dtype=torch.float32) < 0.05


def test_ssim_windows_fit_the_image():
    assert ssim_window(64, 64) == 11 and ssim_window(9, 20) == 9 and ssim_window(16, 16) == 11
    assert ssim_window(64, 64, multiscale=True) == 3          # 64 > (3 - 1) * 16; 5 would need > 64
    assert ssim_window(200, 200, multiscale=True) == 11
    with pytest.raises(ValueError, match="MS-SSIM needs images larger than 32"):
        ssim_window(32, 32, multiscale=True)
    x = torch.rand(2, 1, 48, 48)
    ms = ssim_index(x, (x + 0.05).clamp(0, 1), multiscale=True)           # pytorch-msssim accepts the window
    assert 0.5 < ms.item() < 1.0


def test_psnr_matches_the_formula():
    x = torch.zeros(2, 1, 4, 4)
    y = torch.full((2, 1, 4, 4), 0.1)
    # mse 0.01 -> 20 dB: 0.1's rounding squared, the mean of 16 (15 + 1), the division: relative
    # error r of the mse moves 10 log10 by 10 r / ln 10; log10 adds its own roundings of 20
    r = ops_rtol(2 + 1 + 16 + 1)
    assert torch.allclose(psnr(x, y), torch.full((2,), 20.0), rtol=0, atol=10 * r / math.log(10) + 20 * ops_rtol(0, 1))


def test_supcon_on_a_hand_made_batch():
    emb = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
    T = 0.5
    ident = torch.tensor([0, 0, 1, 1])
    expected = _supcon_rows(emb, ident, T)
    assert len(expected) == 4
    # float32 loss against the float64 formula: each similarity is a 2-d cosine over T, each anchor's
    # term a log-sum-exp over 3 others (|logit| <= 1 / T) minus a similarity, then means
    tol = lambda v: 2 * cosine_atol(2) / T + logsumexp_atol(3, 1 / T) + abs(v) * ops_rtol(2 * 4)  # noqa: E731
    assert SupConLoss(T)(emb, ident).item() == pytest.approx(float(np.mean(expected)), rel=0,
                                                             abs=tol(np.mean(expected)))
    ident2 = torch.tensor([0, 0, 1, 2])          # anchors 2 and 3 have no positive: left out
    expected2 = _supcon_rows(emb, ident2, T)
    assert len(expected2) == 2
    assert SupConLoss(T)(emb, ident2).item() == pytest.approx(float(np.mean(expected2)), rel=0,
                                                              abs=tol(np.mean(expected2)))


def _supcon_rows(emb, ident, T):
    """Khosla et al.'s L_out per anchor with a positive, written out (float64)."""
    e = F.normalize(emb.double(), dim=1).numpy()
    sim = e @ e.T / T
    out = []
    for i in range(len(ident)):
        others = [j for j in range(len(ident)) if j != i]
        pos = [j for j in others if ident[j] == ident[i]]
        if not pos:
            continue
        log_den = math.log(sum(math.exp(sim[i, j]) for j in others))
        out.append(-np.mean([sim[i, p] - log_den for p in pos]))
    return out


def test_kd_loss_is_kl_at_temperature_times_t_squared_and_leaves_the_teacher_alone():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]], requires_grad=True)
    t = torch.tensor([[0.0, 2.0, 0.0], [1.0, 1.0, -2.0]], requires_grad=True)
    T = 3.0
    ps = torch.softmax(s.detach().double() / T, 1).numpy()
    pt = torch.softmax(t.detach().double() / T, 1).numpy()
    kl = (pt * (np.log(pt) - np.log(ps))).sum(1).mean()
    loss = kd_logit_loss(s, t, T)
    # float32 against float64: each log-softmax errs by logsumexp_atol (|z / T| <= 1, a division
    # more), exp(log p_t) by the softmax bound, times |log p_t - log p_s| <= 2; 3 terms summed, the
    # batch mean and T^2 add roundings of the result
    spread = float(max(s.abs().max(), t.abs().max())) / T
    term = 2 * logsumexp_atol(3, spread) + softmax_atol(3, 2 * spread) * 2 * 1.0
    assert loss.item() == pytest.approx(T * T * kl, rel=0, abs=T * T * (term + sum_atol(3 * 2, 3 * 2 * 2) / 2))
    loss.backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0
    # the T^2 factor keeps the gradient scale: d/ds = T (p_s - p_t) / B
    # two softmaxes' errors, times T / 2
    grad_tol = T / 2 * 2 * softmax_atol(3, 2 * spread) + unit_roundoff(torch.float32)
    assert torch.allclose(s.grad.double(), torch.from_numpy(T * (ps - pt) / 2), rtol=0, atol=grad_tol)
    # identical log-probabilities (log_target): exp(l) * (l - l) is 0 exactly
    assert kd_logit_loss(t.detach(), t.detach(), T).item() == 0.0


def test_feature_distillation_is_two_minus_two_cosine():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    cos = torch.tensor([1 / math.sqrt(2), 1.0], dtype=torch.float64)
    # |s_n - t_n|^2 in float32: each unit vector's components err by a 2-norm's chain (5), the
    # difference adds 2 u; squaring doubles that times |d| <= 2; 2 components, 2 rows averaged
    comp = 2 * ops_rtol(5) + 2 * unit_roundoff(torch.float32)
    assert feature_distill_loss(s, t).item() == pytest.approx((2 - 2 * cos).mean().item(), rel=0,
                                                              abs=2 * 2 * 2 * comp + sum_atol(4, 8))


def test_relation_distillation_compares_cosine_similarity_matrices():
    # student rows: (1,0), (0,1), (1,1)/sqrt2 -> cosines 0, .707, .707; teacher: all parallel -> cosines 1
    s = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]], requires_grad=True)
    t = torch.tensor([[1.0, 1.0], [2.0, 2.0], [5.0, 5.0]], requires_grad=True)
    c = 1 / math.sqrt(2)
    off = [(0 - 1) ** 2, (c - 1) ** 2, (c - 1) ** 2]            # the pairs (0,1), (0,2), (1,2), each twice
    loss = relation_distill_loss(s, t)
    # 9 squared differences of two 2-d cosines (each within cosine_atol, |difference| <= 2), their mean
    delta = 2 * cosine_atol(2)
    assert loss.item() == pytest.approx(2 * sum(off) / 9, rel=0, abs=2 * 2 * delta + delta ** 2 + sum_atol(9, 2))
    loss.backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    # a rotated and rescaled copy of the teacher has the same similarities: nothing to learn
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    assert relation_distill_loss(3 * t.detach() @ rot, t).item() == pytest.approx(0.0, abs=delta ** 2 + sum_atol(9, 0))


def _similarity_kd_reference(s: np.ndarray, t: np.ndarray, T: float, diagonal: bool = False,
                             reverse: bool = False) -> float:
    """mean_i KL(p_t,i || p_s,i), p_x,i = softmax over j != i of cos(x_i, x_j) / T, in float64
    (``diagonal`` / ``reverse``: two plausible wrong versions, to show the test tells them apart)."""
    def probs(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        z = x @ x.T / T
        keep = np.ones_like(z, bool) if diagonal else ~np.eye(len(x), dtype=bool)
        z = z[keep].reshape(len(x), -1)
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    ps, pt = probs(s), probs(t)
    if reverse:
        ps, pt = pt, ps
    return float((pt * (np.log(pt) - np.log(ps))).sum(1).mean())


def test_similarity_kd_is_the_kl_of_each_rows_softmax_over_the_other_rows():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 3, generator=g, requires_grad=True)
    t = torch.randn(5, 3, generator=g, requires_grad=True)
    T = 0.5
    expected = _similarity_kd_reference(s.detach().double().numpy(), t.detach().double().numpy(), T)
    loss = similarity_kd_loss(s, t, T)
    # float32 against float64: logits cos / T within cosine_atol / T; each log-softmax over the 4 other
    # rows within logsumexp_atol(4, 1 / T) of that, p_t within softmax_atol(4, 2 / T); per row a
    # p_t-weighted sum of 4 log differences (|.| <= 4 / T), then the mean of 5 rows
    lp = 2 * (cosine_atol(3) / T + logsumexp_atol(4, 1 / T))
    tol = lp + 4 * softmax_atol(4, 2 / T) * 4 / T + sum_atol(4, 4 / T) + sum_atol(5, 4 / T) / 5
    assert loss.item() == pytest.approx(expected, rel=0, abs=tol)
    # the wrong versions are far outside that tolerance: the row's own similarity kept, KL reversed,
    # Hinton's T^2 factor, no temperature
    a, b = s.detach().double().numpy(), t.detach().double().numpy()
    for wrong in (_similarity_kd_reference(a, b, T, diagonal=True), _similarity_kd_reference(a, b, T, reverse=True),
                  T * T * expected, _similarity_kd_reference(a, b, 1.0)):
        assert abs(wrong - expected) > 100 * tol
    loss.backward()
    assert t.grad is None and s.grad.abs().sum() > 0                      # the teacher is a target only
    # the same neighbours at any scale: nothing to learn from a rescaled copy of the teacher
    assert similarity_kd_loss(3 * t.detach(), t, T).item() == pytest.approx(0.0, abs=tol)
    assert similarity_kd_loss(s[:2], t[:2], T).item() == 0.0               # one other row: no distribution


def test_reconstruction_loss_weights_its_terms():
    x, y = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    loss, terms = ReconstructionLoss(charbonnier=2.0, ssim=0.5, lpips=0.0)(x, y)
    assert set(terms) == {"charbonnier", "ssim"}                       # no LPIPS network without its weight
    # scaling by 2 and 0.5 is exact: one rounded sum of two terms
    expected = 2 * terms["charbonnier"].item() + 0.5 * terms["ssim"].item()
    assert loss.item() == pytest.approx(expected, rel=0, abs=sum_atol(2, abs(expected)))
    # the same kernel on the same images, then 1 - that (one rounding)
    assert terms["ssim"].item() == pytest.approx(1 - ssim_index(x, y).item(), rel=0, abs=unit_roundoff(torch.float32))


# ----------------------------------------------------------------------------- LPIPS weights

def test_lpips_missing_weights_is_one_line_saying_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert lpips_weights_file("alex") == expected
    with pytest.raises(LpipsWeightsMissing) as exc:
        ReconstructionLoss(lpips=0.1)
    msg = str(exc.value)
    assert "\n" not in msg and str(expected) in msg and "weight of 0" in msg and "random" in msg
    with pytest.raises(LpipsWeightsMissing, match="no_such.pth"):
        build_lpips("alex", str(tmp_path / "no_such.pth"))


def test_lpips_loads_local_trunk_weights_without_network(tmp_path, monkeypatch):
    from torchvision.models import alexnet

    torch.manual_seed(0)
    # stands in for torchvision's ImageNet file: same names and shapes (the trunk is all LPIPS reads)
    trunk = {f"features.{k}": v for k, v in alexnet().features.state_dict().items()}
    f = tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    f.parent.mkdir(parents=True)
    torch.save(trunk, f)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*a, **k):
        raise AssertionError("network access")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    model = build_lpips("alex")
    assert torch.equal(model.net.state_dict()["slice1.0.weight"], trunk["features.0.weight"])
    assert torch.equal(model.net.state_dict()["slice5.10.bias"], trunk["features.10.bias"])
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.rand(2, 1, 32, 32)
    d_same = lpips_distance(model, x, x)
    d_diff = lpips_distance(model, x, 1 - x)
    # the same image through the same kernels: identical features, a distance of exactly 0
    assert d_same.shape == (2,) and torch.equal(d_same, torch.zeros(2)) and (d_diff > 0).all()
    loss = ReconstructionLoss(lpips=1.0)
    assert "lpips" in loss.terms(x, 1 - x) and not list(loss.parameters())   # an instrument, not trained
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, bad)
    with pytest.raises(LpipsWeightsMissing, match="features.0.weight"):
        build_lpips("alex", str(bad))


# ----------------------------------------------------------------------------- networks

def test_custom_encoder_pyramid_and_student_outputs():
    enc = CustomResNetEncoder(in_chans=1, width=4, depth=3)
    feats = enc(torch.rand(2, 1, 32, 32))
    assert [f.shape[1] for f in feats] == enc.channels == [4, 8, 16, 32]
    assert [32 // f.shape[-1] for f in feats] == enc.reductions == [1, 2, 4, 8]
    net = ThzMtlNet(TINY)
    out = net(torch.rand(3, 1, 32, 32), torch.tensor([0, 1, 4]))
    assert out["embedding"].shape == (3, 16) and out["projection"].shape == (3, 8)
    assert out["posture_logits"].shape == (3, 5) and out["reconstruction"].shape == (3, 1, 32, 32)
    r = out["reconstruction"].detach()
    assert float(r.min()) >= 0.0 and float(r.max()) <= 1.0
    # the same encoder kernels on the same input
    assert torch.equal(net.embed(torch.ones(1, 1, 32, 32)), net(torch.ones(1, 1, 32, 32))["embedding"])


def test_timm_encoder_loads_local_weights_strictly_and_adapts_grey_input(tmp_path):
    import timm

    from models.backbones import WeightsError

    full = timm.create_model("resnet18", num_classes=7)
    f = tmp_path / "r18.pth"
    torch.save(full.state_dict(), f)
    enc = TimmEncoder("resnet18", in_chans=1, weights_path=str(f))
    assert enc.channels == [64, 64, 128, 256, 512] and enc.reductions == [2, 4, 8, 16, 32]
    # grey = summed RGB filters: a sum of 3 in float32
    summed = full.conv1.weight.sum(1)
    assert torch.allclose(enc.body.conv1.weight[:, 0].double(), full.conv1.weight.double().sum(1), rtol=0,
                          atol=sum_atol(3, float(full.conv1.weight.abs().sum(1).amax())))
    assert not torch.allclose(summed, full.conv1.weight[:, 0], rtol=0, atol=1e-3)  # not one channel
    assert torch.equal(enc.body.layer4[1].conv2.weight, full.layer4[1].conv2.weight)
    sd = full.state_dict()
    sd["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="shape mismatch"):
        TimmEncoder("resnet18", in_chans=1, weights_path=str(tmp_path / "bad.pth"))
    with pytest.raises(WeightsError, match="not found"):
        TimmEncoder("resnet18", in_chans=1, weights_path=str(tmp_path / "none.pth"))
    net = ThzMtlNet(ThzNetConfig(encoder="resnet18", embedding_dim=8, projection_dim=4, projection_hidden=8,
                                 decoder_width=8))
    assert net(torch.rand(2, 1, 32, 32))["reconstruction"].shape == (2, 1, 32, 32)


def _feats(B: int = 4):
    torch.manual_seed(0)
    return [torch.rand(B, 4, 16, 16), torch.rand(B, 8, 8, 8), torch.rand(B, 16, 4, 4)]


def _expert_grads(moe: MoEUNetDecoder) -> list[float]:
    return [sum(float(p.grad.abs().sum()) if p.grad is not None else 0.0 for p in e.parameters())
            for e in moe.experts]


def test_hard_gating_sends_gradient_to_the_selected_experts_only():
    moe = MoEUNetDecoder([4, 8, 16], num_experts=5, gating="hard").train()
    logits = torch.zeros(4, 5, requires_grad=True)
    posture = torch.tensor([0, 2, 2, -1])        # the unlabelled row follows the prediction (argmax -> 0)
    out, gate = moe(_feats(), (16, 16), logits, posture)
    assert gate.argmax(1).tolist() == [0, 2, 2, 0]
    out.sum().backward()
    g = _expert_grads(moe)
    assert g[0] > 0 and g[2] > 0 and g[1] == g[3] == g[4] == 0.0
    # every parameter took part (DDP without find_unused_parameters): grads exist, exactly zero
    assert all(p.grad is not None for p in moe.parameters())
    assert logits.grad is None or float(logits.grad.abs().sum()) == 0.0   # hard routing is not differentiable
    # each row is its expert's output on that row alone
    feats = _feats()
    with torch.no_grad():
        alone = moe.experts[2]([f[1:2] for f in feats], (16, 16))
    # a batch of 4 and a batch of 1 may take other conv kernels: each within the expert's bound
    assert torch.allclose(out[1:2].detach(), alone, rtol=0,
                          atol=2 * module_atol(moe.experts[2], [f[1:2] for f in feats], (16, 16)))


def test_inference_routes_by_the_predicted_posture_not_the_label():
    moe = MoEUNetDecoder([4, 8, 16], num_experts=5, gating="hard").eval()
    logits = torch.full((2, 5), -5.0)
    logits[0, 3] = logits[1, 1] = 5.0
    _, gate = moe(_feats(2), (16, 16), logits, torch.tensor([0, 0]))
    assert gate.argmax(1).tolist() == [3, 1]


def test_soft_gating_mixes_every_expert_by_the_posture_softmax():
    moe = MoEUNetDecoder([4, 8, 16], num_experts=5, gating="soft", gate_temperature=2.0).train()
    logits = torch.randn(4, 5, requires_grad=True)
    out, gate = moe(_feats(), (16, 16), logits, torch.tensor([0, 1, 2, 3]))
    assert torch.equal(gate, torch.softmax(logits / 2.0, 1))      # the same kernels
    feats = _feats()
    expert_out = [moe.experts[k](feats, (16, 16)) for k in range(5)]
    manual = sum(gate[:, k, None, None, None] * expert_out[k] for k in range(5))
    # the same expert outputs mixed in another order: 5 products and a sum of 5, gates summing to 1
    largest = max(float(e.abs().amax()) for e in expert_out)
    assert torch.allclose(out, manual, rtol=0, atol=2 * sum_atol(5 + 1, largest))
    out.sum().backward()
    assert all(v > 0 for v in _expert_grads(moe)) and float(logits.grad.abs().sum()) > 0


def test_dual_cross_attention_lets_each_stream_see_the_other():
    att = DualCrossAttention(8, heads=2).eval()
    a, b = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    a1, b1 = att(a, b)
    assert a1.shape == a.shape and b1.shape == b.shape
    a2, _ = att(a, torch.randn(2, 7, 8))    # change the other stream only
    _, b2 = att(torch.randn(2, 5, 8), b)
    tol = module_atol(att, a, b)
    assert (a1 - a2).abs().amax() > 1e3 * tol and (b1 - b2).abs().amax() > 1e3 * tol


def test_teacher_fuses_visible_features_into_every_head():
    teacher = ThzTeacherNet(TINY, vis_chans=3, fusion_dim=8, fusion_heads=2).train()
    thz, vis = torch.rand(3, 1, 32, 32), torch.rand(3, 3, 32, 32)
    out = teacher(thz, vis, torch.tensor([0, 1, 2]))
    assert out["embedding"].shape == (3, 16) and out["reconstruction"].shape == (3, 1, 32, 32)
    (out["reconstruction"].mean() + out["embedding"].sum() + out["posture_logits"].sum()).backward()
    assert float(teacher.vis_encoder.stem[0].weight.grad.abs().sum()) > 0
    teacher.eval()
    with torch.no_grad():
        r1 = teacher(thz, vis)["reconstruction"]
        r2 = teacher(thz, torch.rand(3, 3, 32, 32))["reconstruction"]
    # the decoder's bottleneck carries the visible stream. At init the effect (~1e-3) is below the
    # float32 bound of this whole network, so the check runs in float64, whose bound is ~1e-11
    teacher.double()
    with torch.no_grad():
        r1 = teacher(thz.double(), vis.double())["reconstruction"]
        r2 = teacher(thz.double(), torch.rand(3, 3, 32, 32, dtype=torch.float64))["reconstruction"]
    assert (r1 - r2).abs().amax() > 1e3 * module_atol(teacher, thz, vis, dtype=torch.float64)


# ----------------------------------------------------------------------------- augmentations

def _blob(size: int = 32) -> torch.Tensor:
    x = torch.zeros(1, size, size)
    x[:, 6:12, 18:26] = 0.9
    x[:, 20:28, 4:10] = 0.5
    return x


@pytest.mark.parametrize("profile", ["gentle", "medium", "strong"])
def test_geometry_is_shared_and_corruption_hits_inputs_only(profile):
    aug = ThzAugment(profile)
    x = _blob()
    vis = _blob().expand(3, -1, -1).clone()
    moved = 0
    for seed in range(8):
        torch.manual_seed(seed)
        out = aug({"image": x, "target": x, "vis": vis}, inputs=("image",))
        torch.manual_seed(seed)
        geo = aug({"image": x, "target": x, "vis": vis}, inputs=())      # same draws, no corruption
        assert torch.equal(out["target"], geo["target"]) and torch.equal(geo["image"], geo["target"])
        assert torch.equal(out["vis"][0], geo["target"][0])             # visible: same geometry, not corrupted
        for v in out.values():
            assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0
        moved += int(not torch.equal(geo["target"], x))
    assert moved >= 6                                                   # the geometry does change the images


def test_strong_profile_corrupts_more_than_gentle():
    x = _blob()

    def mean_change(profile: str) -> float:
        aug = ThzAugment(profile)
        d = []
        for seed in range(20):
            torch.manual_seed(seed)
            out = aug({"image": x, "target": x}, inputs=("image",))
            d.append(float((out["image"] - out["target"]).abs().mean()))
        return float(np.mean(d))

    assert 0 < mean_change("gentle") < mean_change("strong")
    assert set(PROFILES) == {"none", "gentle", "medium", "strong"}
    with pytest.raises(ValueError, match="profile"):
        ThzAugment("wild")
    with pytest.raises(ValueError, match="one size"):
        ThzAugment("gentle")({"image": torch.zeros(1, 8, 8), "target": torch.zeros(1, 9, 9)}, inputs=())


def test_residual_experts_start_as_the_input_and_learn_a_correction():
    x = torch.rand(3, 1, 32, 32) * 0.9 + 0.05
    net = ThzMtlNet(ThzNetConfig(**{**TINY.__dict__, "residual": True})).train()
    out = net(x, torch.tensor([0, 2, 4]))
    # zero-initialised output layer: sigmoid(logit(x) + 0). logit's quotient x / (1 - x) rounds 3
    # times and log adds its own (relative to |logit| <= log(0.95 / 0.05)); sigmoid passes a quarter
    # of that on (its slope is <= 1/4) and rounds 1 / (1 + exp(-h)) itself
    logit_err = ops_rtol(3) + ops_rtol(0, 1) * math.log(0.95 / 0.05)
    assert torch.allclose(out["reconstruction"], x, rtol=0, atol=logit_err / 4 + ops_rtol(2, 1))
    (out["reconstruction"] - 0.5).pow(2).mean().backward()
    assert float(net.decoder.experts[2].head.weight.grad.abs().sum()) > 0
    assert not torch.allclose(ThzMtlNet(TINY)(x)["reconstruction"], x, atol=1e-2)   # direct mode: no such start
