"""models/losses.py: the uncertainty-weighted sum (Kendall et al. 2018) written out,
``0.5 * sum_i (exp(-w_i) L_i + w_i)``, at log-variances away from 0 (at w = 0 the ``+ w_i``
term is 0 and a version without it gives the same value)."""
from __future__ import annotations

import math

import pytest
import torch

from models.losses import DynamicLossWeights
from tests.tolerance import gamma


def test_uncertainty_weighted_sum_value_and_gradients_at_nonzero_log_variances():
    w = DynamicLossWeights(["a", "b", "c"])
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.5, -1.0, 2.0]))
    la = torch.tensor(3.0, requires_grad=True)
    lb = torch.tensor(0.25, requires_grad=True)
    total = w({"a": la, "b": lb})                           # "c" absent: contributes nothing
    total.backward()
    expected = 0.5 * (math.exp(-0.5) * 3.0 + 0.5 + math.exp(1.0) * 0.25 - 1.0)
    # two exps, two products, four sums and the halving, each one float32 rounding on values <= 5
    tol = gamma(12) * 5.0
    assert float(total.detach()) == pytest.approx(expected, rel=0, abs=tol)
    # d/dw_i = 0.5 (1 - exp(-w_i) L_i) (the +w_i term is the 1), 0 for the absent term;
    # d/dL_i = 0.5 exp(-w_i)
    grads = w.log_vars.grad.tolist()
    assert grads[0] == pytest.approx(0.5 * (1 - math.exp(-0.5) * 3.0), rel=0, abs=tol)
    assert grads[1] == pytest.approx(0.5 * (1 - math.exp(1.0) * 0.25), rel=0, abs=tol)
    assert grads[2] == 0.0
    assert float(la.grad) == pytest.approx(0.5 * math.exp(-0.5), rel=0, abs=tol)
    assert float(lb.grad) == pytest.approx(0.5 * math.exp(1.0), rel=0, abs=tol)
    assert w.weights() == pytest.approx({"a": 0.5 * math.exp(-0.5), "b": 0.5 * math.exp(1.0),
                                         "c": 0.5 * math.exp(-2.0)}, rel=0, abs=tol)


def test_the_learned_weight_settles_where_the_loss_equals_its_variance():
    """Minimising over w alone: 0.5 (exp(-w) L + w) is smallest at w = log L (without the
    + w term it would fall without bound as w grows)."""
    w = DynamicLossWeights(["a"])
    opt = torch.optim.SGD(w.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        w({"a": torch.tensor(4.0)}).backward()
        opt.step()
    # gradient descent contracts by 0.75 a step (slope 0.5 at the optimum, lr 0.5): after 200 steps
    # only float32 is left: the gradient's few roundings on exp(-w) L ~ 1 over the slope 0.5, and w's ulp
    assert float(w.log_vars[0]) == pytest.approx(math.log(4.0), rel=0, abs=gamma(8) * 4.0)
