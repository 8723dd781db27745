"""Parameters whose rows are split across ranks (a sharded identity head,
:mod:`models.partial_fc`), as the strategies and checkpoints see them.

- Gradients: such a parameter's gradient is already this rank's whole share;
  DDP must neither average nor broadcast it (:func:`ddp_ignore`), and the global
  gradient norm adds every rank's rows once (:func:`clip_grad_norm`).
- Checkpoints hold the whole matrix, rows in order, and its optimizer state the
  same way (:func:`gathered_state` on every rank, rank 0 gets the whole; then
  :func:`local_state` takes this rank's rows on load). A checkpoint is thus the
  same file at any world size: a run resumes at another world size, and
  ``biomtl export`` / ``eval`` / the inference engine load the whole head in one
  process. Rank 0 needs host memory for the whole head and its optimizer state
  while it saves (a 2M x 512 head with Adam: 12 GB).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.partial_fc import RowShard, row_shard_of, shard_range

__all__ = ["clip_grad_norm", "ddp_ignore", "gathered_state", "local_state", "row_sharded"]


def row_sharded(module: nn.Module) -> dict[str, tuple[nn.Parameter, RowShard]]:
    """Name -> (parameter, its shard) for every row-sharded parameter of ``module``."""
    return {name: (p, shard) for name, p in module.named_parameters() if (shard := row_shard_of(p)) is not None}


def ddp_ignore(module: nn.Module) -> None:
    """Tell DDP (before wrapping) to leave the row-sharded parameters alone."""
    names = list(row_sharded(module))
    if names:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """The global gradient norm over replicated and row-sharded parameters (each row
    once over all ranks), clipping to ``max_norm`` when it is > 0 (as
    ``torch.nn.utils.clip_grad_norm_`` does on replicated ones)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sharded = [p.grad for p in params if p.grad is not None and row_shard_of(p) is not None]
    replicated = [p.grad for p in params if p.grad is not None and row_shard_of(p) is None]
    zero = grads[0].new_zeros((), dtype=torch.float32)
    local = torch.nn.utils.get_total_norm(sharded).float() ** 2 if sharded else zero.clone()
    shard = next(row_shard_of(p) for p in params if p.grad is not None and row_shard_of(p) is not None) \
        if sharded else None
    if shard is not None and shard.world > 1:
        dist.all_reduce(local, group=shard.group)
    rest = torch.nn.utils.get_total_norm(replicated).float() ** 2 if replicated else zero
    total = (local + rest).sqrt()
    if max_norm > 0:  # (it clips the .grad of the parameters it is given)
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return float(total)


# ---------------------------------------------------------------------- checkpoints

def _gather_rows_to_main(t: torch.Tensor, shard: RowShard) -> torch.Tensor | None:
    """The whole ``[total, ...]`` tensor on rank 0 of the shard's group (``None`` elsewhere)."""
    if shard.world == 1:
        return t.detach().clone()
    sizes = [hi - lo for lo, hi in (shard_range(shard.total, r, shard.world) for r in range(shard.world))]
    pad = max(sizes) - t.shape[0]
    t = F.pad(t.detach(), (0, 0) * (t.dim() - 1) + (0, pad)) if pad else t.detach().contiguous()
    main = shard.rank == 0
    parts = [torch.empty_like(t) for _ in range(shard.world)] if main else None
    dst = 0 if shard.group is None else dist.get_global_rank(shard.group, 0)
    dist.gather(t, parts, dst=dst, group=shard.group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]) if main else None


def _optimizer_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """id(parameter) -> its number in ``optimizer.state_dict()`` (the order of the groups)."""
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    return {pid: i for i, pid in enumerate(ids)}


def gathered_state(module: nn.Module, optimizer: torch.optim.Optimizer | None,
                   model_state: dict[str, Any], optimizer_state: dict[str, Any] | None) -> None:
    """Replace, in place, each row-sharded parameter's rows in ``model_state`` (and its
    per-row optimizer state in ``optimizer_state``) by the whole matrix. Every rank
    calls it; only rank 0's dicts are whole afterwards (the others are for no one)."""
    index = _optimizer_index(optimizer) if optimizer is not None else {}
    for name, (param, shard) in sorted(row_sharded(module).items()):
        whole = _gather_rows_to_main(model_state[name], shard)
        if whole is not None:
            model_state[name] = whole
        number = index.get(id(param), -1)
        state = (optimizer_state or {}).get("state", {}).get(number)
        if state is not None:  # Optimizer.state_dict() hands out the live per-parameter dicts: copy first
            state = optimizer_state["state"][number] = dict(state)
        for key, value in sorted((state or {}).items()):
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == param.shape[0]:
                whole = _gather_rows_to_main(value, shard)
                if whole is not None:
                    state[key] = whole


def local_state(module: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: Mapping[str, Any],
                optimizer_state: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(model_state, optimizer_state)`` with each row-sharded parameter (and its per-row
    optimizer state) cut to this rank's rows: what ``load_state_dict`` takes here."""
    model_state = dict(model_state)
    shards = row_sharded(module)
    if not shards:
        return model_state, dict(optimizer_state) if optimizer_state is not None else None
    index = _optimizer_index(optimizer) if optimizer is not None else {}
    opt = None
    if optimizer_state is not None:
        opt = dict(optimizer_state)
        opt["state"] = {k: dict(v) for k, v in optimizer_state.get("state", {}).items()}
    for name, (param, shard) in shards.items():
        rows = slice(shard.offset, shard.offset + param.shape[0])
        if name in model_state and model_state[name].shape[0] == shard.total:
            model_state[name] = model_state[name][rows]
        state = (opt or {}).get("state", {}).get(index.get(id(param), -1), {})
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == shard.total:
                state[key] = value[rows].clone()
    return model_state, opt
