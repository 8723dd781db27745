"""Distillation from a frozen teacher that only offers ``embed(images)`` (any biomtl model).

A face teacher's identity classes are not the student's (another data set, another split), so the
teacher's *predictions* here are its in-batch similarity structure: for each image ``i`` of the
batch, the softmax over the other images ``j != i`` of ``cos(t_i, t_j) / T``. The student's
distribution is built the same way from its own embedding (or its distillation token), and the loss
is Hinton's soft-target KL with the usual ``T^2`` factor (gradients of the same size whatever T):

    P_x[i, j] = exp(cos(x_i, x_j) / T) / sum_{k != i} exp(cos(x_i, x_k) / T)     (j != i)
    loss      = T^2 * mean_i sum_{j != i} P_t[i, j] * (log P_t[i, j] - log P_s[i, j])

This is the relational (similarity-distribution) form of knowledge distillation (Park et al.,
"Relational Knowledge Distillation", 2019; Passalis & Tefas, "Probabilistic knowledge transfer",
2018): it needs no projection between embedding widths, and it is DeiT's soft distillation when the
"classes" are the other images of the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MIN_TEMPERATURE", "MAX_TEMPERATURE", "relation_distill_loss", "similarity_log_probs"]

# cos / T lies within [-1/T, 1/T]; the masked diagonal (-1e4) must stay far below it in float32.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
_MASKED = -1.0e4


def similarity_log_probs(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[B, B]`` log P_x (rows: softmax over the other samples; the diagonal is ~-1e4 away)."""
    z = F.normalize(x if x.dtype == torch.float64 else x.float(), dim=1)  # float64 kept (tests)
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return (z @ z.t() / temperature).masked_fill(eye, _MASKED).log_softmax(dim=1)


def relation_distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * mean_i KL(P_teacher[i] || P_student[i])`` over the batch (module docstring);
    the teacher side carries no gradient. Needs a batch of at least 2."""
    log_t = similarity_log_probs(teacher.detach(), temperature)
    log_s = similarity_log_probs(student, temperature)
    eye = torch.eye(log_t.shape[0], dtype=torch.bool, device=log_t.device)
    kl = (log_t.exp() * (log_t - log_s)).masked_fill(eye, 0.0).sum(dim=1)
    return kl.mean() * temperature * temperature
