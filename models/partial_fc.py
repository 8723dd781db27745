"""Partial FC: a margin head whose class centres are split across ranks, with
an optional sample of the negative centres (An et al., "Partial FC: Training 10
Million Identities on a Single Machine", ICCVW 2021; insightface's
``arcface_torch/partial_fc_v2.py``).

Each of ``world`` ranks holds the centres of a contiguous block of classes
(:func:`shard_range`: about ``C / world`` rows). A training forward

1. gathers every rank's embeddings and labels (the global batch, ``N`` rows);
2. picks this rank's columns: all of them at ``sample_rate = 1``, else every
   centre that is a positive of the global batch plus random negatives, up to
   ``ceil(sample_rate * C_local)``, drawn from ``(sample_seed, draws, rank)`` so a
   resumed run draws the same ones (``draws`` counts training forwards and is
   saved with the weights);
3. computes float32 cosines, applies the margin to the target cosine only (the
   margin functions of :mod:`models.heads`), scales by ``s``;
4. takes the softmax cross-entropy over all ranks' columns with a max and a sum
   all-reduced across ranks (:class:`_ShardedSoftmaxCE`): the mean over the
   labelled rows of the global batch.

The loss value is the same on every rank. Its gradient reaches this rank's
embeddings through the backward of the gather (a sum over ranks); it is then
multiplied by ``world`` because DDP (and DeepSpeed) average the backbone's
gradients over ranks: after that average the backbone gets the gradient of the
global-batch loss, as with a replicated head. The centres are rank-local: the
strategy must leave them out of its gradient averaging and parameter broadcast
(:func:`row_shard_of` marks them) and a checkpoint gathers them into the whole
``[C, D]`` matrix (so a run resumes, and a model is evaluated, at any world size).

A world of one holds every centre and needs no process group: the head is then
a plain margin head with a loss of its own (what one-process runs, ``biomtl
eval`` and the inference engine build).

Written here, not imported: insightface's implementation is a training script's
module (no package), tied to its own all-gather and to CUDA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.heads import target_margin

__all__ = ["RowShard", "ShardedMarginHead", "row_shard_of", "shard_range"]

# Rows of the centre matrix initialised from one generator: the initial weights
# then depend on the seed only, not on how many ranks share the rows.
_INIT_BLOCK = 4096


def shard_range(num_classes: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``num_classes`` that rank ``rank`` of ``world`` holds:
    contiguous blocks, the first ``num_classes % world`` ranks one row more."""
    base, extra = divmod(num_classes, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class RowShard:
    """A parameter holding rows ``[offset, offset + rows)`` of a ``[total, ...]`` matrix
    whose other rows live on the other ranks of ``group``."""

    total: int
    offset: int
    rank: int
    world: int
    group: Any = None


def row_shard_of(param: torch.Tensor) -> RowShard | None:
    """The :class:`RowShard` a parameter was marked with (``None``: replicated)."""
    return getattr(param, "biomtl_row_shard", None)


class ShardedMarginHead(nn.Module):
    """ArcFace or CosFace over centres sharded across ranks; see the module docstring.

    ``loss(emb, labels)``: the margin softmax loss of the global batch (margin and
    sampling in training mode only). ``topk(emb, k)``: the ``k`` nearest centres of
    every row over all ranks (margin-free), as global class ids."""

    def __init__(self, margin: str, in_features: int, num_classes: int, s: float = 30.0, m: float = 0.5,
                 sample_rate: float = 1.0, rank: int = 0, world: int = 1, group: Any = None):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not 1 <= world <= num_classes:
            raise ValueError(f"a world of {world} ranks cannot share {num_classes} identities (one each at least)")
        self.margin_kind, self._target = margin, target_margin(margin)
        self.in_features, self.num_classes, self.s, self.m = in_features, num_classes, float(s), float(m)
        self.sample_rate, self.rank, self.world, self.group = float(sample_rate), rank, world, group
        self.lo, self.hi = shard_range(num_classes, rank, world)
        # the seed of the initial centres and of the negative samples: rank 0's, so the shards fit together
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device="cpu")  # on the host even under a meta build
        if world > 1:
            dist.broadcast(seed, src=_global_rank(group, 0), group=group)
        self.register_buffer("sample_seed", seed.reshape(()).to(torch.empty(0).device))
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))
        self.weight = nn.Parameter(_init_rows(self.lo, self.hi, num_classes, in_features, int(seed.item())))
        self.weight.biomtl_row_shard = RowShard(num_classes, self.lo, rank, world, group)

    @property
    def num_local(self) -> int:
        return self.hi - self.lo

    def extra_repr(self) -> str:
        return (f"{self.margin_kind}, in_features={self.in_features}, num_classes={self.num_classes} "
                f"(rows {self.lo}:{self.hi} here, world {self.world}), s={self.s}, m={self.m}, "
                f"sample_rate={self.sample_rate}")

    # ------------------------------------------------------------------ sampling
    def sample(self, labels_all: torch.Tensor) -> torch.Tensor | None:
        """Local row ids used this step (sorted), or ``None`` for all of them.
        Every local row that is a label of the global batch is in it."""
        if self.sample_rate >= 1.0:
            return None
        keep = max(1, math.ceil(self.sample_rate * self.num_local))
        here = labels_all[(labels_all >= self.lo) & (labels_all < self.hi)] - self.lo
        gen = torch.Generator(device="cpu").manual_seed(_mix(int(self.sample_seed), int(self.draws), self.rank))
        score = torch.rand(self.num_local, generator=gen).to(self.weight.device)
        score[here] = 2.0  # positives first
        keep = max(keep, int(torch.unique(here).numel()))
        return torch.topk(score, keep, sorted=False).indices.sort().values

    # ------------------------------------------------------------------ loss
    def loss(self, emb: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
             row_margin: torch.Tensor | None = None, row_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``row_margin`` (``margin="magface"``): each row's margin ``m(a)``, applied whenever
        given (as MagFace's loss does), its gradient reaching the magnitudes. ``row_weight``:
        each row's class weight (the weighted mean of ``F.cross_entropy(weight=...)``)."""
        if (row_margin is None) == (self.margin_kind == "magface"):
            raise ValueError("row_margin goes with margin='magface' (and only with it)")
        if row_weight is not None and label_smoothing > 0:
            raise ValueError("class weights with label smoothing are not supported by the sharded head")
        counts = _row_counts(emb.shape[0], self.group, self.world)
        emb_all = _GatherRows.apply(emb, self.group, counts) if self.world > 1 else emb
        labels_all = _gather_rows(labels.long(), self.group, counts)
        if row_margin is not None and self.world > 1:
            row_margin = _GatherRows.apply(row_margin, self.group, counts)
        weight_all = _gather_rows(row_weight.float(), self.group, counts) if row_weight is not None else None
        valid = (labels_all >= 0) & (labels_all < self.num_classes)
        weight, rows = self.weight, None
        if self.training:
            rows = self.sample(torch.where(valid, labels_all, -1))
            self.draws += 1
            if rows is not None:
                weight = weight[rows]
        cos = _cosine(emb_all, weight)
        local = torch.where(valid & (labels_all >= self.lo) & (labels_all < self.hi), labels_all - self.lo, -1)
        if rows is not None:  # the label's column among the sampled rows (every positive is sampled)
            local = torch.where(local >= 0, torch.searchsorted(rows, local.clamp(min=0)), -1)
        margin = row_margin.to(cos.dtype).unsqueeze(1) if row_margin is not None else self.m
        if row_margin is not None or (self.training and self.m != 0):
            has = local >= 0
            col = local.clamp(min=0).unsqueeze(1)
            cos_y = cos.gather(1, col)
            cos = cos.scatter(1, col, torch.where(has.unsqueeze(1), self._target(cos_y, margin), cos_y))
        weight = valid.to(cos.dtype) if weight_all is None else valid.to(cos.dtype) * weight_all.to(cos.dtype)
        return _ShardedSoftmaxCE.apply(cos * self.s, local, weight, float(label_smoothing), self.group, self.world)

    # ------------------------------------------------------------------ nearest centres
    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        """``s * cos`` to every centre, margin-free, as a replicated head's eval logits:
        only in a world of one, where every centre is here (inference, one-process runs)."""
        if self.world != 1:
            raise RuntimeError("logits over every class need every centre: use topk() across ranks")
        return _cosine(emb, self.weight) * self.s

    @torch.no_grad()
    def topk(self, emb: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest centres of each row over all ranks: ``[B, k]`` global class ids
        (``-1`` past ``num_classes``) and their softmax probabilities over every class
        (``s * cos``, margin-free, as :meth:`logits` would give)."""
        counts = _row_counts(emb.shape[0], self.group, self.world)
        logits = _cosine(_gather_rows(emb.detach(), self.group, counts), self.weight) * self.s
        top = logits.max(dim=1).values
        if self.world > 1:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
        sum_exp = (logits - top.unsqueeze(1)).exp().sum(dim=1)
        kk = min(k, self.num_local)
        val, idx = logits.topk(kk, dim=1)
        if kk < k:  # pad so every rank sends the same shape
            val = F.pad(val, (0, k - kk), value=-math.inf)
            idx = F.pad(idx, (0, k - kk), value=-1 - self.lo)
        idx = idx + self.lo
        if self.world > 1:
            dist.all_reduce(sum_exp, group=self.group)
            val = torch.cat(_all_gather_equal(val, self.group, self.world), dim=1)
            idx = torch.cat(_all_gather_equal(idx, self.group, self.world), dim=1)
        best_val, best = val.topk(min(k, val.shape[1]), dim=1)
        prob = (best_val - top.unsqueeze(1)).exp() / sum_exp.unsqueeze(1)
        mine = _my_rows(counts, self.group)
        return idx.gather(1, best)[mine], prob[mine]


# ---------------------------------------------------------------------- helpers

def _global_rank(group: Any, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _mix(seed: int, draw: int, rank: int) -> int:
    """A 63-bit generator seed from (seed, draw, rank); splitmix64's finaliser, so
    neighbouring draws are unrelated."""
    x = (seed ^ (draw * 0x9E3779B97F4A7C15) ^ (rank * 0xBF58476D1CE4E5B9)) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def _init_rows(lo: int, hi: int, total: int, dim: int, seed: int) -> torch.Tensor:
    """Rows ``[lo, hi)`` of a Xavier-uniform ``[total, dim]`` matrix (the replicated
    heads' init), drawn block by block from ``seed``: the same whole matrix at any world size."""
    bound = math.sqrt(6.0 / (total + dim))
    out = torch.empty(hi - lo, dim)
    if out.is_meta:  # a model built for its shapes only (torch.device("meta")): no values to draw
        return out
    for block in range(lo // _INIT_BLOCK, (hi + _INIT_BLOCK - 1) // _INIT_BLOCK):
        start = block * _INIT_BLOCK
        rows = torch.empty(min(_INIT_BLOCK, total - start), dim)
        rows.uniform_(-bound, bound, generator=torch.Generator().manual_seed(_mix(seed, block, 0)))
        a, b = max(lo, start), min(hi, start + rows.shape[0])
        out[a - lo:b - lo] = rows[a - start:b - start]
    return out


def _cosine(emb: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cosines in float32, or float64 when given float64 (the exactness tests)."""
    dtype = torch.promote_types(torch.promote_types(emb.dtype, weight.dtype), torch.float32)
    return F.linear(F.normalize(emb.to(dtype), dim=1), F.normalize(weight.to(dtype), dim=1))


def _row_counts(n: int, group: Any, world: int) -> list[int]:
    """Every rank's row count (one small all-gather; ``[n]`` in a world of one)."""
    if world == 1:
        return [n]
    counts = torch.tensor([n], dtype=torch.int64)
    out = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(out, counts, group=group)
    return [int(c) for c in out]


def _all_gather_equal(t: torch.Tensor, group: Any, world: int) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def _gather_rows(t: torch.Tensor, group: Any, counts: list[int]) -> torch.Tensor:
    """Every rank's rows in rank order; ``counts``: each rank's row count (they may differ)."""
    if len(counts) == 1:
        return t
    pad = max(counts) - t.shape[0]
    padded = F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)) if pad else t
    parts = _all_gather_equal(padded, group, len(counts))
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def _my_rows(counts: list[int], group: Any) -> slice:
    """This rank's rows in a gathered batch."""
    rank = dist.get_rank(group) if len(counts) > 1 else 0
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


class _GatherRows(torch.autograd.Function):
    """All-gather of rows whose backward sums every rank's gradient of this rank's
    rows and multiplies it by ``world`` (DDP then averages it back: module docstring)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: Any, counts: list[int]) -> torch.Tensor:
        ctx.group, ctx.world, ctx.rows = group, len(counts), _my_rows(counts, group)
        return _gather_rows(t, group, counts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce-scatter; the sum is the same
        return grad[ctx.rows] * ctx.world, None, None


class _ShardedSoftmaxCE(torch.autograd.Function):
    """Weighted mean softmax cross-entropy (optionally label-smoothed as
    ``F.cross_entropy`` does) over the rows, each row's columns spread across ranks.
    ``target``: the label's column here, or ``-1`` when another rank holds it;
    ``valid``: each row's weight (0 for unlabelled rows, else 1 or its class weight)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, eps: float,
                group: Any, world: int) -> torch.Tensor:
        def reduce(t: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
            if world > 1:
                dist.all_reduce(t, op=op, group=group)
            return t

        top = reduce(logits.detach().max(dim=1).values.clone(), dist.ReduceOp.MAX)
        shifted = logits.detach() - top.unsqueeze(1)
        exp = shifted.exp()
        log_z = reduce(exp.sum(dim=1)).log()
        has = target >= 0
        logp_t = reduce(torch.where(has, shifted.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1), 0.0))
        logp_t = logp_t - log_z
        rows = -logp_t
        classes = logits.new_tensor(float(logits.shape[1]))
        if eps > 0:
            reduce(classes)
            sum_logp = reduce(shifted.sum(dim=1)) - classes * log_z
            rows = (1.0 - eps) * rows - eps * sum_logp / classes
        n = valid.sum().to(logits.dtype)
        n = torch.where(n > 0, n, torch.ones_like(n))  # nothing labelled: a 0 loss
        ctx.save_for_backward(exp / log_z.exp().unsqueeze(1), target, valid, n)
        ctx.eps, ctx.classes = eps, float(classes)
        return (rows * valid).sum() / n

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        prob, target, valid, n = ctx.saved_tensors
        g = prob.clone()
        if ctx.eps > 0:
            g -= ctx.eps / ctx.classes
        has = (target >= 0) & (valid > 0)
        rows = has.nonzero().squeeze(1)
        g[rows, target[rows]] -= 1.0 - ctx.eps
        g *= (valid.to(g.dtype) * grad / n).unsqueeze(1)
        return g, None, None, None, None, None
