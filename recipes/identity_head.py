"""The identity head of a recipe: replicated on every rank (``models.heads``) or,
with ``identity_head_sharding: partial_fc``, its centres split across the
training ranks (:class:`models.partial_fc.ShardedMarginHead`: Partial FC, for
identities that do not fit one GPU).

A recipe puts :class:`HeadShardingParams`' two fields in its ``Params``, builds
the head with :func:`build_head` and asks :func:`identity_outputs` for the
identity loss and what its metrics read, so the sharded head needs nothing else
of it. A recipe without an identity head has no such keys: setting them there is
an unknown-key error of the config.
"""
from __future__ import annotations

import logging
from typing import Any, Literal, Mapping

import torch
from torch import nn

from models.heads import build_identity_head
from models.losses import masked_cross_entropy
from models.partial_fc import ShardedMarginHead
from recipes.base import ParallelContext, RecipeDataError

__all__ = ["SHARDING_CHOICES", "build_head", "check_ranks", "check_sharding", "identity_outputs",
           "note_world_of_one", "top_identities"]

log = logging.getLogger("biomtl")

SHARDING_CHOICES = ("none", "partial_fc")
Sharding = Literal["none", "partial_fc"]


def check_sharding(sharding: str, sample_rate: float, head_kind: str) -> None:
    """The params alone (a ``Params.__post_init__`` calls it): one-line ``ValueError``."""
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1] (the share of negative centres each step), got {sample_rate}")
    if sharding == "partial_fc" and head_kind not in ("arcface", "cosface", "magface"):
        raise ValueError(f"identity_head_sharding=partial_fc needs a margin head (arcface | cosface | magface), "
                         f"not {head_kind}")
    if sharding == "none" and sample_rate != 1.0:
        raise ValueError("sample_rate < 1 samples the centres of a sharded head: set identity_head_sharding=partial_fc")


def check_ranks(sharding: str, num_classes: int, parallel: ParallelContext) -> None:
    """What the ranks add (``Recipe.use_ranks``): every rank holds one centre at least."""
    if sharding == "partial_fc" and parallel.world > num_classes:
        raise RecipeDataError(f"recipe.params.identity_head_sharding=partial_fc: {parallel.world} ranks cannot share "
                              f"{num_classes} identities (one centre per rank at least); use fewer ranks or "
                              f"identity_head_sharding=none")


def note_world_of_one(sharding: str, parallel: ParallelContext, kind: str, num_classes: int,
                      sample_rate: float) -> None:
    """Say once, in a one-process training run, that the sharded head is a plain one there."""
    if sharding == "partial_fc" and parallel.training and parallel.world == 1:
        log.info("identity_head_sharding=partial_fc in a one-process run: the head holds all %d centres "
                 "(a plain %s head, sample_rate %g)", num_classes, kind, sample_rate)


def build_head(kind: str, sharding: str, sample_rate: float, in_features: int, num_classes: int, s: float,
               m: float | None, parallel: ParallelContext) -> nn.Module:
    """The replicated head, or the sharded one on ``parallel``'s ranks."""
    if sharding != "partial_fc":
        return build_identity_head(kind, in_features, num_classes, s=s, m=m)
    note_world_of_one(sharding, parallel, kind, num_classes, sample_rate)
    margin = {"arcface": 0.5, "cosface": 0.35}.get(kind, 0.0) if m is None else m  # (magface: per row)
    return ShardedMarginHead(kind, in_features, num_classes, s=s, m=margin, sample_rate=sample_rate,
                             rank=parallel.rank, world=parallel.world, group=parallel.group)


def identity_outputs(head: nn.Module, emb: torch.Tensor, labels: torch.Tensor | None, label_smoothing: float,
                     training: bool, top: int = 5) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """``(loss or None without labels, outputs)``. Outputs: ``identity_logits`` where a
    head holds every centre; a sharded head across ranks gives ``identity_topk`` /
    ``identity_topk_prob`` at evaluation instead (read them with :func:`top_identities`)."""
    if not isinstance(head, ShardedMarginHead):
        logits = head(emb, labels if training else None)
        loss = masked_cross_entropy(logits, labels, label_smoothing) if labels is not None else None
        return loss, {"identity_logits": logits}
    out: dict[str, torch.Tensor] = {}
    if not training:  # every rank evaluates the same number of batches: the collectives pair up
        if head.world == 1:
            out["identity_logits"] = head.logits(emb)
        else:
            out["identity_topk"], out["identity_topk_prob"] = head.topk(emb, min(top, head.num_classes))
    if labels is None:
        return None, out
    return head.loss(emb, labels, label_smoothing), out


def top_identities(outputs: Mapping[str, Any], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, k'] class ids, [B, k'] probabilities)``, ``k' = min(k, classes)``, best
    first, from whichever identity outputs the head gave."""
    if "identity_logits" in outputs:
        logits = outputs["identity_logits"].detach().float().cpu()
        prob, ids = logits.softmax(1).topk(min(k, logits.shape[1]), dim=1)
        return ids, prob
    ids = outputs["identity_topk"].detach().cpu()[:, :k]
    return ids, outputs["identity_topk_prob"].detach().float().cpu()[:, :k]
