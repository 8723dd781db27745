"""A row-sharded identity head (Partial FC: :mod:`models.partial_fc`,
:mod:`dist_train.row_shards`) beside a DeepSpeed engine, ZeRO stage 1 or 2.

DeepSpeed treats every parameter its optimizer owns as replicated: it
broadcasts rank 0's values at start, averages the gradients over ranks and
saves rank 0's module weights. The head's rows are each rank's own, so they
stay outside the engine's optimizer (DeepSpeed has no notion of a parameter
split by rows across the data-parallel ranks; its MoE expert groups would
need MoE layers):

- the engine does not broadcast them: ``ds_optim_param`` is DeepSpeed's mark
  for a parameter unique to its rank (its own OptimizedLinear shards);
- ZeRO 1/2 reduce only the parameters their optimizer owns, so the rows'
  gradients stay this rank's share (stage 0 averages every gradient and stage
  3 partitions every parameter: refused by ``preflight.check_sharded_head``);
- they have their own torch optimizer, of the engine optimizer's class and
  each group's settings, stepped right after the engine's step with the
  settings that step used (the LR schedule is the engine's, one owner);
- the global gradient norm (DeepSpeed's clipping, the logged norm) counts the
  rows once over all ranks: the ZeRO optimizer's one norm function,
  ``scaled_global_norm``, is wrapped to add them, and the rows are clipped
  with that same norm, as DDP's ``row_shards.clip_grad_norm`` does;
- they stay fp32: DeepSpeed's bf16 casts the whole module, and keeps fp32
  master copies only of what its optimizer owns;
- a checkpoint holds the whole matrix in the module weights rank 0 writes
  (gathered from every rank) and the rows' optimizer state, whole, in the
  client state; loading cuts this rank's rows, so a checkpoint resumes at any
  world size and exports to one ``model.pt``, as DDP's.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from dist_train import row_shards
from dist_train.config import ConfigError

ROW_OPTIMIZER_KEY = "row_sharded_optimizer"  # in the trainer's client state of a DeepSpeed checkpoint


class RowsBesideEngine:
    """The row-sharded parameters of ``model`` taken out of ``optimizer`` (in
    place, before ``deepspeed.initialize``) into an optimizer of their own."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.module = model
        self.params = row_shards.row_sharded(model)
        rows = {id(p) for p, _ in self.params.values()}
        row_groups, self.sources = [], []
        for number, group in enumerate(optimizer.param_groups):
            mine = [p for p in group["params"] if id(p) in rows]
            if not mine:
                continue
            group["params"] = [p for p in group["params"] if id(p) not in rows]
            if not group["params"]:
                raise ConfigError(f"recipe.params.identity_head_sharding: the head's rows are the only parameters "
                                  f"of optimizer group {number}; DeepSpeed cannot hold an empty group: use "
                                  "train.strategy=ddp")
            row_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine})
            self.sources.append(number)
        # the optimizer whose groups the engine's LR schedule moves (asked each step: a loaded
        # state replaces its param_groups list)
        self.engine_optimizer = optimizer
        self.optimizer = type(optimizer)(row_groups, **optimizer.defaults)
        for param, _ in self.params.values():
            param.ds_optim_param = True  # not broadcast from rank 0 by deepspeed.initialize
        self._fp32 = {name: p.detach().clone() for name, (p, _) in self.params.items()}
        self._rows_sq = torch.zeros(())
        self.clip = 0.0

    def after_initialize(self, zero_optimizer: Any, clip: float) -> None:
        """Undo DeepSpeed's 16-bit cast of the module for the rows (their values as
        built), and make the ZeRO optimizer's global norm count them."""
        for name, (param, _) in self.params.items():
            param.data = self._fp32[name].to(param.device)
        self._fp32 = {}
        self.clip = clip
        own = getattr(zero_optimizer, "scaled_global_norm", None)
        if own is None:  # a DeepSpeed whose ZeRO 1/2 optimizer no longer has its one norm function
            raise ConfigError(f"recipe.params.identity_head_sharding: this DeepSpeed's {type(zero_optimizer).__name__}"
                              " has no scaled_global_norm to add the head's rows to: use train.strategy=ddp")

        def with_rows(norm_type: int = 2) -> torch.Tensor:
            norm = own(norm_type)  # -1 where DeepSpeed found inf/NaN: kept, it skips the step
            return torch.where(norm >= 0, (norm.float() ** 2 + self._rows_sq.to(norm.device)).sqrt(), norm)

        zero_optimizer.scaled_global_norm = with_rows

    def before_step(self) -> list[dict[str, Any]]:
        """All ranks call it before the engine's step: the rows' squared gradient norm
        for the global norm, and each row group's settings now (the engine's step
        then steps the LR schedule)."""
        self._rows_sq = self._grad_norm_sq()
        groups = self.engine_optimizer.param_groups
        return [{k: v for k, v in groups[n].items() if k != "params"} for n in self.sources]

    def _grad_norm_sq(self) -> torch.Tensor:
        grads = [p.grad for p, _ in self.params.values() if p.grad is not None]
        first = next(iter(self.params.values()))
        device = first[0].device
        local = (torch.nn.utils.get_total_norm(grads).float() ** 2 if grads
                 else torch.zeros((), device=device))
        if first[1].world > 1:
            dist.all_reduce(local, group=first[1].group)
        return local

    def step(self, settings: list[dict[str, Any]], skipped: bool, norm: float) -> None:
        """The rows' update after the engine's: clipped by the global ``norm`` the
        engine clipped with (DeepSpeed's rule: divide by ``(norm + 1e-6) / clip`` when > 1)."""
        if not skipped:
            if self.clip > 0:
                factor = (norm + 1e-6) / self.clip
                if factor > 1:
                    for param, _ in self.params.values():
                        if param.grad is not None:
                            param.grad.div_(factor)
            for group, setting in zip(self.optimizer.param_groups, settings):
                group.update(setting)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- checkpoints ---------------------------------------------------------
    @contextlib.contextmanager
    def whole_in_saves(self, client_state: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Every rank enters it (the rows are gathered to rank 0): inside, the
        module's state dict holds the whole matrix, and the yielded client
        state the rows' whole optimizer state."""
        whole = {name: p.detach() for name, (p, _) in self.params.items()}
        state = self.optimizer.state_dict()
        row_shards.gathered_state(self.module, self.optimizer, whole, state)

        def substitute(module: nn.Module, state_dict: dict[str, Any], prefix: str, meta: Any) -> None:
            for name, tensor in whole.items():
                if prefix + name in state_dict:
                    state_dict[prefix + name] = tensor

        handle = self.module.register_state_dict_post_hook(substitute)
        try:
            yield {**client_state, ROW_OPTIMIZER_KEY: state}
        finally:
            handle.remove()

    def load_module(self, src: Mapping[str, Any], dst: nn.Module) -> None:
        """DeepSpeed's ``custom_load_fn``: the saved module weights with this rank's rows."""
        model_state, _ = row_shards.local_state(self.module, None, src, None)
        dst.load_state_dict(model_state, strict=True)

    def load_optimizer(self, client: dict[str, Any], path: Any) -> None:
        """Take the rows' optimizer state out of a loaded client state (this rank's rows)."""
        state = client.pop(ROW_OPTIMIZER_KEY, None)
        if state is None:
            raise RuntimeError(f"{path}: the checkpoint has no optimizer state for the row-sharded identity head "
                               "(written without recipe.params.identity_head_sharding)")
        _, local = row_shards.local_state(self.module, self.optimizer, {}, state)
        self.optimizer.load_state_dict(local)
