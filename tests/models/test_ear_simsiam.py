"""models/ear.py: SimSiam's loss, ``-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2``: its value and
where its gradient goes (the stop-gradient is what keeps SimSiam from collapsing)."""
from __future__ import annotations

import torch

from models.ear import simsiam_loss
from tests.tolerance import cosine_atol


def _vectors(dim: int = 8, rows: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(rows, dim, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]


def test_value_is_the_mean_negative_cosine_of_each_prediction_with_the_other_projection():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[3.0, 0.0], [1.0, 0.0]])                 # cosines with p: 1 and 0
    q = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    y = torch.tensor([[0.0, -1.0], [-5.0, 0.0]])               # cosines with q: -1 and 1
    value = float(simsiam_loss(p, z, q, y))
    assert abs(value - (-(0.5 * (1 + 0) + 0.5 * (-1 + 1)) / 2)) <= 4 * cosine_atol(2, torch.float32)


def test_the_projections_get_no_gradient_the_predictions_the_cosine_one():
    p1, z2, p2, z1 = _vectors()
    simsiam_loss(p1, z2, p2, z1).backward()
    # stop-gradient: the target projections are constants of the loss
    assert z1.grad is None and z2.grad is None
    # d/dp of -cos(p, z) / (2 B): -(z / (|p| |z|) - cos(p, z) p / |p|^2) / (2 B), float64
    for p, z in ((p1, z2), (p2, z1)):
        pn, zn = p.detach().norm(dim=1, keepdim=True), z.detach().norm(dim=1, keepdim=True)
        cos = (p.detach() * z.detach()).sum(1, keepdim=True) / (pn * zn)
        expected = -(z.detach() / (pn * zn) - cos * p.detach() / pn**2) / (2 * p.shape[0])
        # the loss casts to float32 (p.float()): its gradient is a float32 cosine's
        torch.testing.assert_close(p.grad, expected, rtol=0, atol=8 * cosine_atol(p.shape[1], torch.float32))
