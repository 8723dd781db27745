"""Training strategies behind one interface; pick one by ``train.strategy``."""
from __future__ import annotations

from dist_train.strategies.base import Strategy, StepStats, StrategyOptions


def build_strategy(name: str, **kwargs) -> Strategy:
    """``name``'s strategy from the model, the device, the optimizer and scheduler
    factories and its :class:`StrategyOptions` (``options=``)."""
    if name == "ddp":
        from dist_train.strategies.ddp import DDPStrategy

        return DDPStrategy(**kwargs)
    if name == "deepspeed":
        from dist_train.strategies.deepspeed import DeepSpeedStrategy  # noqa: F401

        return DeepSpeedStrategy(**kwargs)
    if name == "fsdp":
        from dist_train.strategies.fsdp import FSDPStrategy

        return FSDPStrategy(**kwargs)
    raise ValueError(f"unknown strategy {name}")


__all__ = ["Strategy", "StepStats", "StrategyOptions", "build_strategy"]
