"""DistributedDataParallel with autocast, GradScaler, accumulation and clipping."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_train import row_shards
from dist_train.checkpoint import safe_load
from recipes.model_file import read_trainer_state, trainer_checkpoint
from recipes.batch import move_batch
from dist_train.strategies.base import Strategy, StepStats, StrategyOptions, scaled_update


class DDPStrategy(Strategy):
    def __init__(self, model: nn.Module, device: torch.device,
                 make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                 make_scheduler: Callable[[torch.optim.Optimizer], Any], options: StrategyOptions):
        self.channels_last = options.channels_last
        self.device = device
        self.precision = options.precision
        self.grad_clip = options.grad_clip
        model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self._module = model
        world = dist.get_world_size() if dist.is_initialized() else 1
        # A world of one skips the wrapper: nothing to synchronise.
        self.model: nn.Module = model
        self._row_sharded = bool(row_shards.row_sharded(model))  # a sharded identity head (Partial FC)
        if world > 1:
            row_shards.ddp_ignore(model)  # its rows are this rank's own: no averaging, no broadcast
            self.model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=options.find_unused_parameters)
        self._ddp = self.model  # no_sync lives on the DDP wrapper, also under torch.compile
        if options.compile:
            self.model = torch.compile(self.model)
        self.optimizer = make_optimizer(model)
        self.scheduler = make_scheduler(self.optimizer)
        self.scaler = self.precision.make_scaler()
        self._skipped_steps = 0

    @property
    def module(self) -> nn.Module:
        return self._module

    def micro_step(self, batch: Mapping[str, Any], loss_scale: float, boundary: bool) -> dict[str, Any]:
        batch = self._to_device(batch)
        sync = contextlib.nullcontext() if boundary or self._ddp is self._module else self._ddp.no_sync()
        with sync:
            with self.precision.autocast():
                out = self.model(batch)
            self.scaler.scale(out["loss"].float() * loss_scale).backward()
        return out

    def optimizer_step(self) -> StepStats:
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self._row_sharded:  # the norm adds every rank's rows once
            norm = row_shards.clip_grad_norm(params, self.grad_clip)
        elif self.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        else:
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in params])) if params else 0.0
        stats = scaled_update(self.scaler, self.optimizer, self.scheduler, norm)
        self._skipped_steps += stats.skipped
        return stats

    @property
    def skipped_steps(self) -> int:
        return self._skipped_steps

    @torch.no_grad()
    def eval_forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        batch = self._to_device(batch)
        with self.precision.autocast():
            return self._module(batch)

    def _to_device(self, batch: Mapping[str, Any]) -> Any:
        batch = move_batch(batch, self.device)
        if self.channels_last:  # the image batches (float or 8-bit pixels), in the layout the weights are in
            batch = {k: v.contiguous(memory_format=torch.channels_last)
                     if isinstance(v, torch.Tensor) and v.dim() == 4 else v
                     for k, v in batch.items()}
        return batch

    def save_checkpoint(self, path: Path, client_state: dict[str, Any]) -> None:
        model_state, optimizer_state = self._module.state_dict(), self.optimizer.state_dict()
        if self._row_sharded:  # every rank sends its rows; rank 0 writes the whole head
            row_shards.gathered_state(self._module, self.optimizer, model_state, optimizer_state)
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        from dist_train.checkpoint import atomic_save

        atomic_save(trainer_checkpoint(model_state, optimizer_state,
                                       self.scheduler.state_dict(), self.scaler.state_dict(), self._skipped_steps,
                                       client_state), path)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        state = read_trainer_state(safe_load(path))  # FormatError (a ValueError): the trainer names the file
        model_state, optimizer_state = row_shards.local_state(self._module, self.optimizer, state.model,
                                                              state.optimizer)
        self._module.load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(state.scheduler)
        if state.scaler:
            self.scaler.load_state_dict(state.scaler)
        self._skipped_steps = state.skipped_steps
        return dict(state.client)
