"""What the trainer needs from a strategy (DDP, DeepSpeed, ...).

The trainer owns the loop (epochs, accumulation windows, validation,
checkpoint policy); a strategy owns how one micro-batch is run, how gradients
are synchronised and applied, and what a checkpoint holds.
"""
from __future__ import annotations

import abc
import math
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from dist_train.precision import Precision


@dataclass(frozen=True)
class StrategyOptions:
    """What a strategy needs of the run's settings, and nothing else of the config
    (the trainer builds it: ``trainer.strategy_options``)."""

    precision: Precision  # resolved for the device
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    find_unused_parameters: bool = False  # DDP
    compile: bool = False  # DDP: torch.compile of the training model
    channels_last: bool = False  # DDP: weights and 4-D image batches in NHWC
    world_size: int = 1
    # DeepSpeed: the dict for ``deepspeed.initialize``, built and checked by
    # ``preflight.deepspeed_json`` (the user's JSON + the toolkit's settings)
    deepspeed_json: Mapping[str, Any] | None = None


@dataclass
class StepStats:
    lr: float
    grad_norm: float  # before clipping; nan when not computed
    skipped: bool  # fp16 overflow: the optimizer step was skipped


def scaled_update(scaler: Any, optimizer: torch.optim.Optimizer, scheduler: Any, norm: float) -> StepStats:
    """The end of a torch-optimizer step (DDP, FSDP): the GradScaler's step and update,
    zeroed gradients, and the LR schedule stepped only when the update was applied (as
    DeepSpeed's engine does). ``norm``: the gradient norm measured before clipping."""
    scale_before = scaler.get_scale() if scaler.is_enabled() else 1.0
    scaler.step(optimizer)
    scaler.update()
    # GradScaler backs the scale off exactly when it found inf/NaN and skipped optimizer.step()
    skipped = scaler.is_enabled() and scaler.get_scale() < scale_before
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    if not skipped:
        scheduler.step()
    return StepStats(lr=lr, grad_norm=norm if math.isfinite(norm) else float("nan"), skipped=skipped)


class Strategy(abc.ABC):
    # the torch LR scheduler the strategy steps, where it has one (a resume with a
    # changed schedule replays it: trainer._replay_schedule)
    scheduler: Any = None

    @property
    @abc.abstractmethod
    def module(self) -> nn.Module:
        """The unwrapped recipe module (for evaluation, export, artefacts)."""

    @abc.abstractmethod
    def micro_step(self, batch: Mapping[str, Any], loss_scale: float, boundary: bool) -> dict[str, Any]:
        """Forward and backward one micro-batch. ``loss_scale`` is 1/window
        length; gradients are synchronised across ranks only when ``boundary``."""

    @abc.abstractmethod
    def optimizer_step(self) -> StepStats:
        """Clip, step the optimizer and the LR schedule, zero the gradients.
        An update skipped for an fp16 overflow leaves the LR schedule where it
        was: after ``N`` applied updates the LR is the schedule's value at
        ``N``, however many windows were skipped (the trainer's step counter
        counts windows, skipped ones included)."""

    @property
    def skipped_steps(self) -> int:
        """Updates skipped for fp16 overflow so far (kept across a resume)."""
        return 0

    @abc.abstractmethod
    def eval_forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Forward in evaluation mode without gradients (same call count on every rank)."""

    @contextlib.contextmanager
    def gathered(self) -> Iterator[nn.Module]:
        """The recipe module with its whole parameters for a block in which a
        recipe calls its methods or submodules directly (artefacts, epoch
        hooks, .bin scoring); every rank enters it. DDP and DeepSpeed (whose
        ZeRO-3 hooks gather per submodule) have them already; FSDP gathers."""
        yield self.module

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    @abc.abstractmethod
    def save_checkpoint(self, path: Path, client_state: dict[str, Any]) -> None:
        """Called on every rank; ``path`` is a file or directory name to create."""

    @abc.abstractmethod
    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Restore model/optimizer/scheduler/scaler; return the client state."""

    @property
    def checkpoint_suffix(self) -> str:
        return ".pt"

    def lean_checkpoint(self, latest: Path) -> Any | None:
        """What best / top-k keep of the ``latest`` checkpoint (saved by the
        checkpoint manager on rank 0; None: ``latest`` linked as it is). Default:
        a file without its optimizer state; a folder is linked."""
        from dist_train.checkpoint import weights_only_of_file

        return weights_only_of_file(latest)

    @property
    def lean_suffix(self) -> str:
        """The suffix of best / top-k checkpoints."""
        return self.checkpoint_suffix

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """A consolidated fp32 state dict of the recipe module (every rank calls it;
        a row-sharded head is whole on rank 0)."""
        from dist_train.row_shards import gathered_state

        state = self.module.state_dict()
        gathered_state(self.module, None, state, None)
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in state.items()}
