"""Learning-rate schedules stepped once per optimizer step."""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, LambdaLR, LinearLR, LRScheduler, SequentialLR

from dist_train.config import SchedulerConfig


def warmup_steps(cfg: SchedulerConfig, total_steps: int) -> int:
    if cfg.warmup_steps:
        return min(cfg.warmup_steps, max(total_steps - 1, 0))
    return int(cfg.warmup_ratio * total_steps)


def _warmup_factor(step: int, warmup: int) -> float:
    # (step+1)/(warmup+1): the first update already moves the weights.
    return (step + 1) / (warmup + 1)


class _WarmupCosine:
    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return _warmup_factor(step, self.warmup)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _WarmupPoly:
    def __init__(self, warmup: int, total: int, min_ratio: float, power: float):
        self.warmup, self.total, self.min_ratio, self.power = warmup, total, min_ratio, power

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return _warmup_factor(step, self.warmup)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * (1 - progress) ** self.power


def build_scheduler(cfg: SchedulerConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
    warmup = warmup_steps(cfg, total_steps)
    if cfg.name == "constant":
        return LambdaLR(optimizer, lambda step: _warmup_factor(step, warmup) if step < warmup else 1.0)
    if cfg.name == "warmup_cosine":
        return LambdaLR(optimizer, _WarmupCosine(warmup, total_steps, cfg.min_lr_ratio))
    if cfg.name == "warmup_poly":
        return LambdaLR(optimizer, _WarmupPoly(warmup, total_steps, cfg.min_lr_ratio, cfg.power))
    if cfg.name == "cosine_restarts":
        base_lr = optimizer.param_groups[0]["lr"]
        restarts = CosineAnnealingWarmRestarts(optimizer, T_0=cfg.restart_period, T_mult=cfg.restart_mult,
                                               eta_min=cfg.min_lr_ratio * base_lr)
        if not warmup:
            return restarts
        ramp = LinearLR(optimizer, start_factor=1 / (warmup + 1), end_factor=1.0, total_iters=warmup)
        return SequentialLR(optimizer, [ramp, restarts], milestones=[warmup])
    raise ValueError(f"unknown scheduler {cfg.name}")
