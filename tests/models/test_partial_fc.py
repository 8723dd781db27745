"""The sharded margin head (models/partial_fc.py) against the replicated heads'
formulas: one process (a world of one) and two gloo ranks, loss and gradients of
the embeddings and of the centres; the negative sample; the nearest centres."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from models.heads import ArcFace, CosFace
from models.partial_fc import ShardedMarginHead, _init_rows, row_shard_of, shard_range
from tests.tolerance import gamma, ops_rtol

S = 30.0
MARGIN = {"arcface": 0.5, "cosface": 0.35}


def reference_loss(emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, kind: str, m: float,
                   eps: float = 0.0) -> torch.Tensor:
    """The replicated head's loss written out: ``s * cos``, the margin on the target
    cosine only (``cos(acos(c) + m)`` / ``c - m``), mean CE over the labelled rows."""
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T
    C = weight.shape[0]
    valid = (labels >= 0) & (labels < C)
    rows = valid.nonzero().squeeze(1)
    y = labels[rows]
    c = cos[rows, y]
    target = torch.cos(torch.acos(c) + m) if kind == "arcface" else c - m
    cos = cos.index_put((rows, y), target)
    return F.cross_entropy(S * cos, torch.where(valid, labels, -100), ignore_index=-100, label_smoothing=eps)


def _batch(n: int, dim: int, classes: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, dim, generator=g, dtype=dtype)
    weight = torch.randn(classes, dim, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    labels[1] = -1  # unlabelled: no margin, not in the mean
    # a target cosine with room for the margin: theta_y + m < pi, the formula's own range
    emb[labels >= 0] += 0.5 * F.normalize(weight[labels[labels >= 0]], dim=1) * emb.norm(dim=1, keepdim=True)[
        labels >= 0]
    return emb, weight, labels


def _head(kind: str, weight: torch.Tensor, rank: int = 0, world: int = 1, rate: float = 1.0) -> ShardedMarginHead:
    C, D = weight.shape
    head = ShardedMarginHead(kind, D, C, s=S, m=MARGIN[kind], sample_rate=rate, rank=rank, world=world)
    with torch.no_grad():
        head.weight.data = weight[head.lo:head.hi].clone()
    return head


def test_shard_range_covers_every_row_once_in_blocks_one_row_apart():
    for C, world in [(10, 3), (7, 7), (100_003, 8), (5, 1)]:
        ranges = [shard_range(C, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == C
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [hi - lo for lo, hi in ranges]
        assert max(sizes) - min(sizes) <= 1


def test_initial_centres_are_one_matrix_whatever_the_world_size():
    C, D, seed = 9000, 4, 1234  # rows across three init blocks
    whole = _init_rows(0, C, C, D, seed)
    for world in (2, 3, 7):
        parts = [_init_rows(*shard_range(C, r, world), C, D, seed) for r in range(world)]
        assert torch.equal(torch.cat(parts), whole)
    bound = math.sqrt(6.0 / (C + D))  # Xavier-uniform, as the replicated heads
    assert whole.abs().max() <= bound and whole.abs().max() > 0.9 * bound
    assert not torch.equal(_init_rows(0, C, C, D, seed + 1), whole)


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_world_of_one_is_the_replicated_head_in_float64(kind, eps):
    emb, weight, labels = _batch(12, 8, 10, seed=1)
    head = _head(kind, weight).double().train()
    e1 = emb.clone().requires_grad_(True)
    loss = head.loss(e1, labels, label_smoothing=eps)
    loss.backward()
    loss = loss.detach()
    e2, w2 = emb.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref = reference_loss(e2, w2, labels, kind, MARGIN[kind], eps)
    ref.backward()
    ref = ref.detach()
    tol = 1e3 * gamma(1, torch.float64)  # float64 against float64: a few hundred roundings of O(10) values
    assert abs(float(loss) - float(ref)) <= tol * float(ref)
    assert torch.allclose(e1.grad, e2.grad, rtol=0, atol=tol)
    assert torch.allclose(head.weight.grad, w2.grad, rtol=0, atol=tol)
    # evaluation mode: the plain softmax over s * cos, no margin
    head.eval()
    assert abs(float(head.loss(emb, labels, eps)) - float(reference_loss(emb, weight, labels, kind, 0.0, eps))) <= tol


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_float32_matches_the_replicated_module_within_float32_rounding(kind):
    emb, weight, labels = _batch(16, 32, 20, seed=2, dtype=torch.float32)
    rep = (ArcFace if kind == "arcface" else CosFace)(32, 20, s=S, m=MARGIN[kind]).train()
    rep.weight.data = weight.clone()
    valid = labels >= 0
    ref = F.cross_entropy(rep(emb, labels)[valid], labels[valid])
    loss = _head(kind, weight).train().loss(emb, labels)
    # cosines: a D-term dot product and two norms; the margin (sqrt, cos) and the softmax (exp, log)
    bound = 2 * S * ops_rtol(32 + 8, 4)
    assert abs(float(loss) - float(ref)) <= bound


def test_sample_keeps_every_positive_is_reproducible_and_moves_on():
    C = 1000
    head = ShardedMarginHead("arcface", 8, C, sample_rate=0.1)
    labels = torch.tensor([3, 3, 999, 500, -1, 42])
    first = head.sample(labels)
    assert first.numel() == 100 and set(labels[labels >= 0].tolist()) <= set(first.tolist())
    assert torch.equal(first, first.sort().values)
    assert torch.equal(head.sample(labels), first)  # same (seed, draw): same sample
    head.draws += 1
    second = head.sample(labels)
    assert not torch.equal(second, first)
    again = ShardedMarginHead("arcface", 8, C, sample_rate=0.1)
    again.load_state_dict(head.state_dict())  # a resumed run: seed and draw count come back
    assert torch.equal(again.sample(labels), second)
    many = torch.arange(0, 200)  # more positives than the rate keeps: all of them
    assert torch.equal(head.sample(many), many)


def test_sampled_loss_is_the_softmax_over_the_sampled_centres():
    emb, weight, labels = _batch(10, 8, 200, seed=3)
    head = _head("cosface", weight, rate=0.2).double().train()
    rows = head.sample(labels)
    loss = head.loss(emb, labels)
    assert int(head.draws) == 1
    remap = torch.full((200,), -1, dtype=torch.long)
    remap[rows] = torch.arange(rows.numel())
    sub = torch.where(labels >= 0, remap[labels.clamp(min=0)], -1)
    ref = reference_loss(emb, weight[rows], sub, "cosface", MARGIN["cosface"])
    assert abs(float(loss) - float(ref)) <= 1e3 * gamma(1, torch.float64) * float(ref)


def test_topk_is_the_nearest_centres_and_the_weight_is_marked_rank_local():
    emb, weight, _ = _batch(6, 8, 30, seed=4)
    head = _head("arcface", weight).double()
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T
    ids, prob = head.topk(emb, 5)
    assert torch.equal(ids, cos.topk(5, dim=1).indices)
    ref_prob = (S * cos).softmax(1).topk(5, dim=1).values
    assert torch.allclose(prob, ref_prob, rtol=1e3 * gamma(1, torch.float64), atol=0)
    assert torch.allclose(head.logits(emb), S * cos, rtol=0, atol=1e3 * gamma(1, torch.float64) * S)
    assert row_shard_of(head.weight).total == 30 and row_shard_of(head.weight).offset == 0


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_sample_rate_outside_zero_one_is_refused(bad):
    with pytest.raises(ValueError, match="sample_rate"):
        ShardedMarginHead("arcface", 8, 10, sample_rate=bad)


# ---------------------------------------------------------------------- two ranks

def _two_rank_worker(rank: int, init: str, kind: str, rate: float, eps: float, out: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        sizes = (5, 7)  # unequal batches: the gather pads and trims
        emb, weight, labels = _batch(sum(sizes), 8, 11, seed=5)
        mine = slice(0, 5) if rank == 0 else slice(5, 12)
        head = _head(kind, weight, rank=rank, world=2, rate=rate).double().train()
        e = emb[mine].clone().requires_grad_(True)
        # the sample loss() draws next (same seed and draw count); the reference is the softmax over both ranks'
        rows_here = head.sample(labels) if rate < 1 else None
        loss = head.loss(e, labels[mine], label_smoothing=eps)
        loss.backward()
        top, prob = head.topk(emb[mine], 3)
        gathered = [None, None]
        dist.all_gather_object(gathered, {"loss": float(loss), "emb_grad": e.grad, "w_grad": head.weight.grad,
                                          "lo": head.lo, "top": top, "prob": prob,
                                          "rows": None if rows_here is None else rows_here + head.lo})
        if rank == 0:
            out.update(emb=emb, weight=weight, labels=labels, ranks=gathered)
    finally:
        dist.destroy_process_group()


def _run_two_ranks(tmp_path, kind: str, rate: float, eps: float = 0.0) -> dict:
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_two_rank_worker, args=(f"file://{tmp_path}/store", kind, rate, eps, out), nprocs=2, join=True)
    return dict(out)


@pytest.mark.parametrize("kind, eps", [("arcface", 0.0), ("cosface", 0.1)])
def test_two_ranks_equal_the_replicated_head_on_the_global_batch(tmp_path, kind, eps):
    got = _run_two_ranks(tmp_path, kind, 1.0, eps)
    emb, weight, labels = got["emb"], got["weight"], got["labels"]
    e, w = emb.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref = reference_loss(e, w, labels, kind, MARGIN[kind], eps)
    ref.backward()
    tol = 1e3 * gamma(1, torch.float64)
    r0, r1 = got["ranks"]
    assert r0["loss"] == pytest.approx(float(ref), rel=tol) and r1["loss"] == pytest.approx(float(ref), rel=tol)
    # each rank's embedding gradient is world x its rows of the global gradient (DDP averages it back)
    emb_grad = torch.cat([r0["emb_grad"], r1["emb_grad"]]) / 2
    assert torch.allclose(emb_grad, e.grad, rtol=0, atol=tol)
    assert torch.allclose(torch.cat([r0["w_grad"], r1["w_grad"]]), w.grad, rtol=0, atol=tol)
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T
    assert torch.equal(torch.cat([r0["top"], r1["top"]]), cos.topk(3, dim=1).indices)
    ref_prob = (S * cos).softmax(1).topk(3, dim=1).values
    assert torch.allclose(torch.cat([r0["prob"], r1["prob"]]), ref_prob, rtol=tol, atol=0)


def test_two_ranks_sampled_keep_every_positive_of_the_global_batch(tmp_path):
    got = _run_two_ranks(tmp_path, "arcface", 0.5)
    emb, weight, labels = got["emb"], got["weight"], got["labels"]
    r0, r1 = got["ranks"]
    rows = torch.cat([r0["rows"], r1["rows"]])
    assert set(labels[labels >= 0].tolist()) <= set(rows.tolist())
    remap = torch.full((11,), -1, dtype=torch.long)
    remap[rows] = torch.arange(rows.numel())
    sub = torch.where(labels >= 0, remap[labels.clamp(min=0)], -1)
    ref = reference_loss(emb, weight[rows], sub, "arcface", MARGIN["arcface"])
    assert r0["loss"] == pytest.approx(float(ref), rel=1e3 * gamma(1, torch.float64))
    # centres outside the sample get no gradient
    w_grad = torch.cat([r0["w_grad"], r1["w_grad"]])
    out = torch.ones(11, dtype=torch.bool)
    out[rows] = False
    assert torch.count_nonzero(w_grad[out]) == 0 and torch.count_nonzero(w_grad[rows]) > 0


def test_dcal_with_a_sharded_head_in_one_process_gives_the_replicated_losses():
    """The DCAL model's SA / GLCA / PWCA identity terms through the sharded head (a
    world of one) equal the replicated heads' on the same weights and batch."""
    from models.dcal import DCAL
    from tests.models.test_dcal import TINY

    common = dict(num_classes=5, metric_loss="none", dynamic_weights=False, **TINY)
    torch.manual_seed(0)
    rep = DCAL(**common).train()
    sharded = DCAL(head_sharding="partial_fc", **common).train()
    missing, unexpected = sharded.load_state_dict(rep.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"head_sa.sample_seed", "head_sa.draws", "head_glca.sample_seed",
                                                "head_glca.draws"}
    g = torch.Generator().manual_seed(3)
    batch = {"image": torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g),
             "identity": torch.tensor([0, 0, 1, 1, 2, 4]), "twin": torch.full((6,), -1)}
    torch.manual_seed(1)
    a = rep(batch)["terms"]
    torch.manual_seed(1)
    b = sharded(batch)["terms"]
    assert set(a) == set(b) == {"sa", "glca", "pwca"}
    for name in a:  # float32 logits s * cos of 30 classes at most: a derived float32 bound
        assert abs(float(a[name].detach()) - float(b[name].detach())) <= 2 * S * ops_rtol(64 + 8, 4), name
    assert int(sharded.head_sa.draws) == 2  # SA and PWCA share the SA head: two softmaxes


def test_ear_pseudo_label_head_refill_gives_each_rank_its_rows_of_one_matrix():
    """recipes.ear_teacher.reinit_head on a sharded head: rank r's rows are rows
    [offset, offset + n) of what a replicated head of all the rows gets."""
    import numpy as np
    from torch import nn

    from models.partial_fc import RowShard
    from recipes.ear_teacher import reinit_head

    centroids = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    whole = nn.Module()
    whole.weight = nn.Parameter(torch.zeros(7, 4))
    reinit_head(whole, centroids, seed=11)
    part = nn.Module()
    part.weight = nn.Parameter(torch.zeros(3, 4))
    part.weight.biomtl_row_shard = RowShard(total=7, offset=4, rank=1, world=2)
    reinit_head(part, centroids, seed=11)
    assert torch.equal(part.weight.data, whole.weight.data[4:7])
    assert torch.allclose(whole.weight.data[:5], F.normalize(torch.as_tensor(centroids), dim=1))


def test_magface_through_the_sharded_head_is_maglinear_and_magfaceloss():
    """The photometric identity loss with the sharded head (a world of one): the same
    MagFace value and gradients as MagLinear + MagFaceLoss, class weights included."""
    from models.heads import MagLinear
    from models.losses import MagFaceLoss, masked_mean_of_sum

    g = torch.Generator().manual_seed(7)
    emb = (torch.randn(10, 16, generator=g) * 30).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, -1, 2])
    weight = torch.rand(6, generator=g) + 0.5
    mag = MagFaceLoss(s=64.0, weight=weight)
    rep = MagLinear(16, 6)
    ref, _ = mag(*rep(emb), labels)
    ref.backward()
    ref_emb, ref_w = emb.grad.clone(), rep.weight.grad.clone()
    emb.grad = None
    head = ShardedMarginHead("magface", 16, 6, s=64.0, m=0.0).train()
    head.weight.data = rep.weight.data.clone()
    a = emb.float().norm(dim=1).clamp(mag.l_a, mag.u_a)
    valid = labels >= 0
    ce = head.loss(emb, labels, row_margin=mag.margin(a), row_weight=weight[labels.clamp(min=0)])
    loss = ce + mag.lambda_g * masked_mean_of_sum((mag.regularizer(a) * valid).sum(), valid.sum())
    loss.backward()
    # float32 against float32 of the same formula: cosines of 16 terms, margin (cos, sin, sqrt), softmax over 6
    bound = 2 * 64.0 * ops_rtol(16 + 12, 6)
    assert abs(float(loss.detach()) - float(ref.detach())) <= bound
    for got, want in ((emb.grad, ref_emb), (head.weight.grad, ref_w)):  # relative to the gradient's scale
        assert (got - want).abs().max() <= bound * want.abs().max()
    with pytest.raises(ValueError, match="row_margin"):
        head.loss(emb, labels)
