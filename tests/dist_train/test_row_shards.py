"""dist_train/row_shards.py: the global gradient norm of replicated and row-sharded
parameters, and clipping by it, on two gloo ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_train.row_shards import clip_grad_norm
from models.partial_fc import RowShard

ROWS = torch.arange(12, dtype=torch.float64).reshape(6, 2) - 5.0  # the whole matrix's gradient: 3 rows per rank
REPLICATED = torch.tensor([3.0, -4.0, 12.0], dtype=torch.float64)  # the same on both ranks (after DDP's mean)


def _worker(rank: int, init: str, max_norm: float, out: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        rows = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
        rows.biomtl_row_shard = RowShard(total=6, offset=3 * rank, rank=rank, world=2)
        rows.grad = ROWS[3 * rank:3 * rank + 3].clone()
        rep = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        rep.grad = REPLICATED.clone()
        out[rank] = (clip_grad_norm([rep, rows], max_norm), rep.grad.clone(), rows.grad.clone())
    finally:
        dist.destroy_process_group()


def _run(tmp_path, max_norm: float) -> dict:
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(f"file://{tmp_path}/store", max_norm, out), nprocs=2, join=True)
    return dict(out)


# the norm is accumulated in float32 (as torch's get_total_norm of float32 gradients): a few roundings
TOL = 8 * torch.finfo(torch.float32).eps


def test_the_norm_counts_each_row_once_and_clipping_scales_every_gradient(tmp_path) -> None:
    whole = float(torch.cat([ROWS.flatten(), REPLICATED]).norm())  # one process holding everything
    out = _run(tmp_path, max_norm=2.0)
    for rank, (norm, rep, rows) in out.items():
        # wrong versions: the rows of one rank only, or every rank's rows plus the replicated part twice
        assert abs(norm - whole) <= TOL * whole, (rank, norm, whole)
        factor = 2.0 / (whole + 1e-6)  # torch's clip_grads_with_norm_ rule
        torch.testing.assert_close(rep, REPLICATED * factor, rtol=TOL, atol=0)
        torch.testing.assert_close(rows, ROWS[3 * rank:3 * rank + 3] * factor, rtol=TOL, atol=0)


def test_no_clipping_at_zero_leaves_the_gradients(tmp_path) -> None:
    out = _run(tmp_path, max_norm=0.0)
    for rank, (_, rep, rows) in out.items():
        assert torch.equal(rep, REPLICATED) and torch.equal(rows, ROWS[3 * rank:3 * rank + 3])
