"""The relational distillation loss (models/distill.py) against its formula, written out
independently in float64, and against the plausible wrong versions of it."""
from __future__ import annotations

import math

import pytest
import torch

from models.distill import relation_distill_loss
from tests.tolerance import cosine_atol, gamma, logsumexp_atol, softmax_atol

B, D_S, D_T = 6, 5, 7  # the widths differ: the loss needs no projection


def reference(s: torch.Tensor, t: torch.Tensor, temp: float, *, diagonal: bool = False, t2: bool = True,
              reverse: bool = False, normalise: bool = True) -> float:
    """T^2 * mean_i sum_{j != i} P_t[i,j] log(P_t[i,j] / P_s[i,j]), P_x[i,j] = softmax over j != i of
    cos(x_i, x_j) / T; the keywords give the plausible wrong versions."""
    def log_probs(x: torch.Tensor) -> list[list[float | None]]:
        rows = []
        for i in range(len(x)):
            js = [j for j in range(len(x)) if diagonal or j != i]
            if normalise:
                sims = {j: float(x[i] @ x[j] / (x[i].norm() * x[j].norm())) / temp for j in js}
            else:
                sims = {j: float(x[i] @ x[j]) / temp for j in js}
            top = max(sims.values())
            lse = top + math.log(sum(math.exp(v - top) for v in sims.values()))
            rows.append([sims[j] - lse if j in sims else None for j in range(len(x))])
        return rows
    ls, lt = log_probs(s), log_probs(t)
    if reverse:
        ls, lt = lt, ls
    kl = [sum(math.exp(lt[i][j]) * (lt[i][j] - ls[i][j]) for j in range(len(s)) if lt[i][j] is not None)
          for i in range(len(s))]
    return (temp * temp if t2 else 1.0) * sum(kl) / len(kl)


def bound(temp: float, d: int, diff: float, dtype: torch.dtype = torch.float64) -> float:
    """|computed - exact|: each log-probability errs by <= e = 2 cos error / T + the log-sum-exp's;
    a row's KL by the weighted sum of two such (<= 2e, the weights sum to 1), the probabilities'
    own errors times the largest |log ratio| ``diff`` over B terms, and the sum's roundings; x T^2."""
    e = 2 * cosine_atol(d, dtype) / temp + logsumexp_atol(B, 1 / temp, dtype)
    return temp * temp * (2 * e + B * softmax_atol(B, 2 / temp, dtype) * diff + gamma(2 * B, dtype) * (1 + diff))


@pytest.mark.parametrize("temp", [0.1, 1.0, 4.0])
def test_loss_is_the_t2_scaled_kl_of_in_batch_similarity_distributions(temp):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, D_S, generator=g, dtype=torch.float64) * 3
    t = torch.randn(B, D_T, generator=g, dtype=torch.float64) * 0.5
    got = float(relation_distill_loss(s, t, temp))
    want = reference(s, t, temp)
    assert want > 0 and got == pytest.approx(want, rel=0, abs=bound(temp, max(D_S, D_T), 4 / temp))
    wrong = {"self-pairs kept": reference(s, t, temp, diagonal=True),
             "no T^2": reference(s, t, temp, t2=False),
             "KL(student || teacher)": reference(s, t, temp, reverse=True),
             "dot products, not cosines": reference(s, t, temp, normalise=False)}
    for name, value in wrong.items():
        if name == "no T^2" and temp == 1.0:
            continue  # the same number at T = 1
        assert abs(got - value) > 1e3 * bound(temp, max(D_S, D_T), 4 / temp), name


def test_zero_for_the_teacher_itself_any_scale_and_no_gradient_to_the_teacher():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(B, D_T, generator=g, dtype=torch.float64, requires_grad=True)
    s = (t.detach() * 2.5).requires_grad_(True)  # same directions: same distributions
    loss = relation_distill_loss(s, t, 0.5)
    assert abs(float(loss)) <= bound(0.5, D_T, 0.0)
    loss.backward()
    assert t.grad is None  # the teacher side is detached
    other = torch.randn(B, D_S, generator=g, dtype=torch.float64)
    assert float(relation_distill_loss(other, t, 0.5)) > 1e3 * bound(0.5, D_T, 8.0)


def test_float32_stays_finite_at_the_smallest_temperature():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(B, D_S, generator=g, requires_grad=True)
    t = torch.randn(B, D_T, generator=g)
    loss = relation_distill_loss(s, t, 0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
