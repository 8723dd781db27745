"""The photometric recipes' parts: MagFace (margin, regulariser, the paper's
lambda_g bound, gradient into the feature magnitude), focal loss, gradient
reversal, uncertainty weighting, IR-SE-50, the other backbones and the
multi-channel augmentations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.heads import MagLinear
from models.losses import DynamicLossWeights, FocalLoss, MagFaceLoss, magface_lambda_g_bound
from models.photometric import (IRSE, ArrayAugment, CbamResNet, GradientReversal, PhotometricEncoder,
                                grad_reverse, grl_lambda)
from tests.tolerance import logsumexp_atol, ops_rtol, sum_atol, unit_roundoff


def test_magface_margin_and_regulariser_match_hand_computed_values():
    loss = MagFaceLoss(s=64, l_a=10, u_a=110, l_m=0.45, u_m=0.8, lambda_g=35)
    a = torch.tensor([10.0, 60.0, 110.0])
    # m(a) = 0.35/100 * (a - 10) + 0.45, float32 against decimals: two constants' roundings and three
    # operations on positive values (no cancellation), so a relative bound
    assert loss.margin(a).tolist() == pytest.approx([0.45, 0.625, 0.8], rel=ops_rtol(5), abs=0)
    # g(a) = 1/a + a/110^2; its minimum is at u_a (a division, a division, a sum of positives)
    assert loss.regularizer(a).tolist() == pytest.approx([0.1 + 10 / 12100, 1 / 60 + 60 / 12100, 2 / 110],
                                                         rel=ops_rtol(3), abs=0)
    assert float(loss.regularizer(torch.tensor(110.0))) < float(loss.regularizer(torch.tensor(100.0)))
    # target logit s*cos(theta + m(a)); the other logits s*cos(theta)
    cos = torch.tensor([[0.6, 0.1], [0.2, 0.5]])
    mag = torch.tensor([60.0, 10.0])
    logits = loss.logits(cos, mag, torch.tensor([0, 1]))
    t0, t1 = math.acos(0.6), math.acos(0.5)
    # s (cos_y cos m - sin_y sin m): the two products cancel (cos(t0 + 0.625) ~ 0.02), so an absolute
    # bound: |cos_y cos m| + |sin_y sin m| <= 1 (Cauchy-Schwarz), the chain is the inputs' and m's
    # roundings (6), sqrt(1 - c^2) (3), two products and the difference (3), cos m and sin m (2
    # elementary); the margin's own error moves cos(t + m) by no more than itself
    assert logits.flatten().tolist() == pytest.approx([64 * math.cos(t0 + 0.625), 6.4, 12.8,
                                                       64 * math.cos(t1 + 0.45)], rel=0, abs=64 * ops_rtol(12, 2))
    total, parts = loss(cos, mag, torch.tensor([0, 1]))
    expected_ce = F.cross_entropy(logits, torch.tensor([0, 1]))
    expected_g = (1 / 60 + 60 / 12100 + 1 / 10 + 10 / 12100) / 2
    assert float(parts["ce"]) == float(expected_ce)      # the same kernel on the same logits: exact
    # g: two regularisers (3 operations each), their sum and the halving; positives throughout
    assert float(parts["g"]) == pytest.approx(expected_g, rel=ops_rtol(5), abs=0)
    assert float(total) == pytest.approx(float(expected_ce) + 35 * expected_g, rel=ops_rtol(5 + 3), abs=0)


def test_magface_lambda_g_bound_and_warning():
    # s*K*l_a^2*u_a^2/(u_a^2-l_a^2) with K = 0.35/100: 64*0.0035*100*12100/12000
    # two float64 orderings of a product/quotient of ~10 operations (0.8 - 0.45 is 0.35 rounded)
    assert magface_lambda_g_bound(64, 10, 110, 0.45, 0.8) == pytest.approx(64 * 0.0035 * 1210000 / 12000,
                                                                           rel=ops_rtol(20, dtype=torch.float64))
    assert MagFaceLoss(lambda_g=35).check() is None
    msg = MagFaceLoss(lambda_g=5).check()
    assert msg is not None and "below the paper's bound" in msg and "\n" not in msg
    with pytest.raises(ValueError):
        MagFaceLoss(l_a=50, u_a=20)


def test_magface_gradient_reaches_the_feature_magnitude():
    torch.manual_seed(0)
    head = MagLinear(8, 3, l_a=1.0, u_a=100.0)
    loss_fn = MagFaceLoss(s=16, l_a=1.0, u_a=100.0, l_m=0.2, u_m=0.5, lambda_g=30)
    direction = F.normalize(torch.randn(4, 8), dim=1)
    scale = torch.full((4, 1), 20.0, requires_grad=True)     # the magnitude alone, direction fixed
    cos, a = head(direction * scale)
    # |normalised(d) * 20|: normalising (8 squares summed, sqrt, divide), the product, the norm again
    assert a.detach().tolist() == pytest.approx([20.0] * 4, rel=ops_rtol(2 * (8 + 2) + 1), abs=0)
    loss, _ = loss_fn(cos, a, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert scale.grad is not None and bool((scale.grad.abs() > 1e-6).all())
    # below u_a the regulariser dominates and pulls magnitudes up (g'(a) = -1/a^2 + 1/u_a^2 < 0)
    only_g = MagFaceLoss(s=16, l_a=1.0, u_a=100.0, l_m=0.0, u_m=0.0, lambda_g=30)
    scale.grad = None
    cos, a = head(direction * scale)
    only_g.regularizer(a).mean().backward()
    assert bool((scale.grad < 0).all())


def test_focal_loss_matches_a_direct_computation_with_alpha_and_class_weights():
    torch.manual_seed(1)
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 2, 1, -1, 2, 0])
    w = torch.tensor([1.0, 2.0, 0.5])
    got = FocalLoss(gamma=2.0, weight=w, alpha=0.25)(logits, labels)
    p = logits.softmax(1)
    rows = [i for i in range(6) if labels[i] >= 0]
    # the direct formula in float64; the float32 loss held to its derived bound against it
    p = logits.double().softmax(1)
    num = sum(w[labels[i]].double() * -0.25 * (1 - p[i, labels[i]]) ** 2 * torch.log(p[i, labels[i]]) for i in rows)
    den = sum(w[labels[i]].double() for i in rows)
    assert float(got) == pytest.approx(float(num / den), rel=0, abs=_focal_atol(logits, labels, w, 0.25, 2.0))
    # gamma 0, alpha 1: the cross-entropy (two float32 kernels, each within its bound of float64)
    ce64 = float(F.cross_entropy(logits.double(), labels, ignore_index=-1))
    ce_tol = logsumexp_atol(3, float(logits.abs().amax())) + sum_atol(len(rows), ce64 * len(rows)) / len(rows)
    assert float(FocalLoss(gamma=0.0)(logits, labels)) == pytest.approx(ce64, rel=0,
                                                                        abs=_focal_atol(logits, labels, None, 1.0, 0.0))
    assert float(F.cross_entropy(logits, labels, ignore_index=-1)) == pytest.approx(ce64, rel=0, abs=ce_tol)


def _focal_atol(logits: torch.Tensor, labels: torch.Tensor, w: torch.Tensor | None, alpha: float,
                gamma: float) -> float:
    """Absolute error bound of the float32 focal loss ``-alpha (1 - p)^gamma log p`` (weighted mean over
    the labelled rows), from float64 values: log p errs by ``logsumexp_atol``; ``p = exp(log p)`` adds
    the exp's roundings relative; ``1 - p`` turns that into an absolute error <= p (dlog + E) + u; the
    power moves by gamma (1 - p)^(gamma - 1) times that; the products round a few times; the
    weighted sum and division add their own (weights 1, 2, 0.5 are exact)."""
    u, elem = unit_roundoff(torch.float32), ops_rtol(0, 1)
    logp = logits.double().log_softmax(1)
    rows = [i for i in range(len(labels)) if labels[i] >= 0]
    weights = [float(w[labels[i]]) if w is not None else 1.0 for i in rows]
    errs, values = [], []
    for i in rows:
        lp = float(logp[i, labels[i]])
        p = math.exp(lp)
        d_logp = logsumexp_atol(logits.shape[1], float(logits[i].abs().amax()))
        d_one_minus_p = p * (d_logp + elem) + u
        f = (1 - p) ** gamma
        d_f = gamma * (1 - p) ** max(gamma - 1, 0) * d_one_minus_p + f * ops_rtol(2)
        value = alpha * f * -lp
        errs.append(alpha * (d_f * -lp + f * d_logp) + value * ops_rtol(3))
        values.append(value)
    den = sum(weights)
    num_abs = sum(wt * v for wt, v in zip(weights, values))
    err = (sum(wt * e for wt, e in zip(weights, errs)) + sum_atol(len(rows), num_abs)) / den
    return err + (num_abs / den) * ops_rtol(2)


def test_gradient_reversal_reverses_and_scales_the_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    (grad_reverse(x, 0.3) * 2.0).sum().backward()
    # 2 * -fl(0.3) = fl(-0.6): doubling is exact in binary floating point
    assert torch.equal(x.grad, torch.full_like(x, -0.6))
    # the same float64 expression (gamma * p is exact here): bit-equal
    assert grl_lambda(0.0) == 0.0 and grl_lambda(1.0, 10) == 2 / (1 + math.exp(-10)) - 1
    assert grl_lambda(0.5, 10) == 2 / (1 + math.exp(-5)) - 1
    grl = GradientReversal(total_steps=4, gamma=10).train()
    lams = []
    for _ in range(5):
        y = torch.ones(2, requires_grad=True)
        grl(y).sum().backward()
        lams.append(-float(y.grad[0]))
    # lambda is computed in float32 tensor ops from the step buffer: p = steps / total, gamma p,
    # exp, 1 + e, 2 / (.), max_lambda * (.) and the gradient product are ~6 roundings and one
    # exp on values <= 2; the final "- 1" cancels (lambda near 0), so the bound is absolute, on 2
    two_atol = 2 * ops_rtol(6, 1)
    assert lams == pytest.approx([grl_lambda(k / 4) for k in range(5)], rel=0, abs=two_atol)
    assert int(grl.steps) == 5 and "steps" in grl.state_dict()     # a resumed run continues the schedule


def test_compiled_gradient_reversal_follows_the_schedule_in_one_graph():
    """Issue 33: compiled, the step's lambda is that of the step (an in-place count would hand
    the backward the next step's), with no graph break and no recompile per step."""
    grl = GradientReversal(total_steps=4, gamma=10).train()
    torch._dynamo.reset()
    step = torch.compile(grl, backend="aot_eager", fullgraph=True)
    lams = []
    for k in range(5):
        y = torch.ones(2, requires_grad=True)
        with torch._dynamo.config.patch(error_on_recompile=k > 0):
            step(y).sum().backward()
        lams.append(-float(y.grad[0]))
    assert lams == pytest.approx([grl_lambda(k / 4) for k in range(5)])
    assert int(grl.steps) == 5 and "steps" in grl.state_dict()


def test_uncertainty_weighting_gradient_sign_on_log_variances():
    w = DynamicLossWeights(["big", "small"])
    total = w({"big": torch.tensor(5.0), "small": torch.tensor(0.2)})
    total.backward()
    # d/ds 0.5 (exp(-s) L + s) = 0.5 (1 - exp(-s) L): negative for L > 1 (descent raises s: less weight),
    # positive for L < 1 (descent lowers s: more weight)
    # exp(-0) = 1 exactly; -2 is exact, 0.4 carries 0.2's rounding and one subtraction (approx's default
    # rel 1e-6 = 8 u covers both)
    assert w.log_vars.grad.tolist() == pytest.approx([0.5 * (1 - 5.0), 0.5 * (1 - 0.2)])
    assert float(w.log_vars.grad[0]) < 0 < float(w.log_vars.grad[1])


def test_ir_se50_gives_512_d_at_112():
    torch.manual_seed(0)
    net = IRSE(in_chans=3, img_size=112).eval()
    assert sum(1 for m in net.body) == 24              # 3 + 4 + 14 + 3 bottlenecks: IR-SE-50
    with torch.no_grad():
        out = net(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512) and bool(torch.isfinite(out).all())


def test_cbam_and_separation_give_identity_and_attribute_parts():
    enc = PhotometricEncoder(CbamResNet(1, 32, width=4, blocks=(1, 1)), 32, separation=True, nonid_dim=8)
    ident, attr = enc(torch.randn(3, 1, 32, 32))
    assert ident.shape == (3, 32) and attr.shape == (3, 8)
    plain = PhotometricEncoder(CbamResNet(3, 16, width=4, blocks=(1,)), 16, separation=False)
    i2, a2 = plain(torch.randn(2, 3, 16, 16))
    assert i2.shape == (2, 16) and a2 is i2
    with pytest.raises(ValueError):
        PhotometricEncoder(CbamResNet(3, 16, width=4, blocks=(1,)), 32, separation=False)


def test_array_augment_keeps_shape_and_channels_and_is_seeded():
    x = torch.randn(5, 24, 20)                      # five channels: not an image
    aug = ArrayAugment(p_crop=1.0, scale=(0.5, 0.7), p_noise=1.0, noise_std=0.1)
    torch.manual_seed(3)
    a = aug(x)
    torch.manual_seed(3)
    b = aug(x)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    top, left, h, w = aug.crop_box(24, 20)
    assert 0 <= top <= 24 - h and 0 <= left <= 20 - w and 0.45 * 480 <= h * w <= 0.75 * 480
    assert torch.equal(ArrayAugment(p_crop=0.0, p_noise=0.0)(x), x)
