"""Losses the recipes share.

- :func:`masked_cross_entropy`: CE that ignores label ``-1`` (or out-of-range
  labels) and returns a graph-connected 0 when no row is labelled (keeps DDP's
  "every parameter used" and never gives NaN).
- :func:`weighted_sum`: ``sum_i w_i * L_i`` over named terms.
- :class:`DynamicLossWeights`: learned weighting ``0.5 * sum_i (exp(-w_i) L_i + w_i)``
  (Kendall et al. 2018, as used by DCAL); the ``w_i`` are parameters of the module.
- :class:`FocalLoss`.
- Metric losses for verification with twins: :class:`TwinAwareTripletLoss`
  (batch-hard triplet plus a term whose negatives are the co-twins) and
  :class:`SupConLoss` (supervised contrastive with up-weighted co-twin negatives).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["masked_cross_entropy", "weighted_sum", "DynamicLossWeights", "FocalLoss",
           "TwinAwareTripletLoss", "SupConLoss", "co_twin_mask"]


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                         weight: torch.Tensor | None = None, ignore_out_of_range: bool = False) -> torch.Tensor:
    """Mean CE over rows whose label is in ``[0, C)``; ``0 * logits.sum()`` if none.

    Negative labels are "unlabelled" and skipped. A label ``>= C`` raises
    ``ValueError`` (a data/config mismatch) unless ``ignore_out_of_range``
    (e.g. evaluating identities the classifier never saw).
    """
    labels = labels.long()
    C = logits.shape[1]
    if not ignore_out_of_range and bool((labels >= C).any()):
        raise ValueError(f"label {int(labels.max())} out of range for {C} classes "
                         "(num_classes / identities mismatch?)")
    valid = (labels >= 0) & (labels < C)
    if not bool(valid.any()):
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits[valid].float(), labels[valid], weight=weight, label_smoothing=label_smoothing)


def weighted_sum(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """``sum(weights.get(name, 1) * term)``; a weight of 0 drops the term."""
    weights = weights or {}
    total = None
    for name, value in terms.items():
        w = float(weights.get(name, 1.0))
        if w == 0.0:
            continue
        total = value * w if total is None else total + value * w
    if total is None:
        raise ValueError("weighted_sum: no term with a non-zero weight")
    return total


class DynamicLossWeights(nn.Module):
    """``0.5 * sum_i (exp(-w_i) * L_i + w_i)`` with one learnable ``w_i`` per name.

    ``w_i`` plays the role of a log-variance (initialised to 0, i.e. weight 1).
    Terms not named at construction raise; names may be missing from a call
    (they contribute nothing).
    """

    def __init__(self, names: Iterable[str], init: float = 0.0):
        super().__init__()
        self.names = list(names)
        if not self.names:
            raise ValueError("DynamicLossWeights needs at least one term name")
        self.log_vars = nn.Parameter(torch.full((len(self.names),), float(init)))

    def forward(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        unknown = set(terms) - set(self.names)
        if unknown:
            raise KeyError(f"DynamicLossWeights: unknown terms {sorted(unknown)} (known: {self.names})")
        total = self.log_vars.sum() * 0.0
        for i, name in enumerate(self.names):
            if name in terms:
                w = self.log_vars[i]
                total = total + torch.exp(-w) * terms[name].float() + w
        return 0.5 * total

    def weights(self) -> dict[str, float]:
        """Current effective weights ``0.5 * exp(-w_i)`` (for logging)."""
        with torch.no_grad():
            return {n: float(0.5 * torch.exp(-w)) for n, w in zip(self.names, self.log_vars)}


class FocalLoss(nn.Module):
    """Multi-class focal loss ``-(1-p_y)^gamma log p_y``; labels outside ``[0, C)`` ignored."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight if weight is not None else None, persistent=False)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.long()
        valid = (labels >= 0) & (labels < logits.shape[1])
        if not bool(valid.any()):
            return logits.float().sum() * 0.0
        logp = F.log_softmax(logits[valid].float(), dim=1)
        y = labels[valid]
        logp_y = logp.gather(1, y[:, None]).squeeze(1)
        loss = -((1 - logp_y.exp()) ** self.gamma) * logp_y
        if self.weight is not None:
            w = self.weight[y]
            return (loss * w).sum() / w.sum()
        return loss.mean()


def co_twin_mask(identity: torch.Tensor, twin: torch.Tensor | None) -> torch.Tensor:
    """``[B, B]`` bool: ``mask[i, j]`` when sample ``j`` is of the co-twin of ``i``'s identity.

    ``twin[i]`` is the identity id of ``i``'s co-twin, or ``-1``.
    """
    B = identity.shape[0]
    if twin is None:
        return torch.zeros(B, B, dtype=torch.bool, device=identity.device)
    twin = twin.long()
    return (identity.long()[None, :] == twin[:, None]) & (twin[:, None] >= 0)


class TwinAwareTripletLoss(nn.Module):
    """Batch-hard triplet loss on cosine distance, plus a co-twin term.

    For each anchor with a positive in the batch: ``d_ap`` = farthest positive,
    ``d_an`` = closest sample of another identity; loss ``relu(d_ap - d_an + margin)``.
    The twin term does the same with the closest *co-twin* sample as negative
    (anchors whose co-twin is in the batch), weighted by ``twin_weight``.
    Rows with identity ``< 0`` are ignored. Returns a graph-connected 0 when no
    anchor qualifies.
    """

    def __init__(self, margin: float = 0.3, twin_margin: float | None = None, twin_weight: float = 1.0):
        super().__init__()
        self.margin = margin
        self.twin_margin = margin if twin_margin is None else twin_margin
        self.twin_weight = twin_weight

    def forward(self, emb: torch.Tensor, identity: torch.Tensor, twin: torch.Tensor | None = None) -> torch.Tensor:
        emb = F.normalize(emb.float(), dim=1)
        dist = 1.0 - emb @ emb.t()
        identity = identity.long()
        B = emb.shape[0]
        labelled = identity >= 0
        eye = torch.eye(B, dtype=torch.bool, device=emb.device)
        pair_ok = labelled[:, None] & labelled[None, :]
        pos = (identity[:, None] == identity[None, :]) & ~eye & pair_ok
        neg = (identity[:, None] != identity[None, :]) & pair_ok
        zero = emb.sum() * 0.0
        has_pos = pos.any(1) & neg.any(1)
        if not bool(has_pos.any()):
            return zero
        big = 4.0  # cosine distance is in [0, 2]
        d_ap = torch.where(pos, dist, torch.full_like(dist, -big)).max(1).values
        d_an = torch.where(neg, dist, torch.full_like(dist, big)).min(1).values
        loss = F.relu(d_ap - d_an + self.margin)[has_pos].mean()
        if twin is not None and self.twin_weight > 0:
            tw = co_twin_mask(identity, twin) & pair_ok
            has_twin = tw.any(1) & pos.any(1)
            if bool(has_twin.any()):
                d_at = torch.where(tw, dist, torch.full_like(dist, big)).min(1).values
                loss = loss + self.twin_weight * F.relu(d_ap - d_at + self.twin_margin)[has_twin].mean()
        return loss


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020, L_out) on L2-normalised embeddings.

    Co-twin samples are negatives whose ``exp(sim / T)`` is multiplied by
    ``twin_negative_weight`` in the denominator (>1 makes them harder).
    Anchors without a positive are skipped; rows with identity ``< 0`` ignored.
    """

    def __init__(self, temperature: float = 0.1, twin_negative_weight: float = 1.0):
        super().__init__()
        self.temperature = temperature
        self.twin_negative_weight = twin_negative_weight

    def forward(self, emb: torch.Tensor, identity: torch.Tensor, twin: torch.Tensor | None = None) -> torch.Tensor:
        emb = F.normalize(emb.float(), dim=1)
        identity = identity.long()
        B = emb.shape[0]
        labelled = identity >= 0
        eye = torch.eye(B, dtype=torch.bool, device=emb.device)
        others = ~eye & labelled[:, None] & labelled[None, :]
        pos = (identity[:, None] == identity[None, :]) & others
        anchors = pos.any(1)
        if not bool(anchors.any()):
            return emb.sum() * 0.0
        logits = emb @ emb.t() / self.temperature
        logits = logits - logits.detach().max(1, keepdim=True).values
        log_w = torch.zeros_like(logits)
        if twin is not None and self.twin_negative_weight != 1.0:
            tw = co_twin_mask(identity, twin)
            log_w = log_w.masked_fill(tw, float(torch.log(torch.tensor(self.twin_negative_weight))))
        denom_terms = (logits + log_w).masked_fill(~others, float("-inf"))
        log_denom = torch.logsumexp(denom_terms, dim=1, keepdim=True)
        log_prob = logits - log_denom
        mean_log_pos = (log_prob * pos).sum(1) / pos.sum(1).clamp(min=1)
        return -mean_log_pos[anchors].mean()
