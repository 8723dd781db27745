"""fp16 overflow and the LR schedule (dist_train/strategies/ddp.py): an update
GradScaler skips leaves the weights and the schedule where they were, so after
N applied updates the LR is the schedule's value at N, however many windows
overflowed; the skip count survives a checkpoint round trip."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from dist_train.config import SchedulerConfig
from dist_train.precision import Precision
from dist_train.schedulers import build_scheduler
from dist_train.strategies.base import StrategyOptions
from dist_train.strategies.ddp import DDPStrategy

SCHEDULE = SchedulerConfig(name="warmup_cosine", warmup_steps=2, min_lr_ratio=0.1)
TOTAL = 8
OVERFLOWING = {0, 3, 4, 9}  # windows whose first micro-batch has an inf loss


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, batch):
        # ``boom`` multiplies the loss: inf makes every gradient inf/NaN, as an fp16 overflow does
        return {"loss": self.lin(batch["x"]).float().pow(2).mean() * batch["boom"]}


def _schedule_lrs(n: int) -> list[float]:
    """The schedule's LR before update 0, 1, ..., n (a fresh scheduler stepped n times): the same
    Python arithmetic at the same step count as the strategy's, so the tests compare exactly."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler(SCHEDULE, opt, TOTAL)
    lrs = []
    for _ in range(n + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def _strategy() -> DDPStrategy:
    torch.manual_seed(0)
    return DDPStrategy(Tiny(), torch.device("cpu"), make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                       make_scheduler=lambda o: build_scheduler(SCHEDULE, o, TOTAL),
                       options=StrategyOptions(Precision("fp16", "cpu"), grad_clip=1.0))


def _window(strategy: DDPStrategy, overflow: bool, gen: torch.Generator) -> None:
    """One accumulation window of 2 micro-batches; the overflow is in the first
    (the no-sync one), so it must survive accumulation to be caught."""
    for micro in range(2):
        boom = math.inf if overflow and micro == 0 else 1.0
        strategy.micro_step({"x": torch.randn(6, 4, generator=gen), "boom": torch.tensor(boom)}, 0.5, micro == 1)


def test_overflow_skips_leave_the_schedule_on_applied_updates(tmp_path: Path) -> None:
    strategy = _strategy()
    gen = torch.Generator().manual_seed(1)
    windows = 12
    expected = _schedule_lrs(windows)
    applied = 0
    for w in range(windows):
        before = [p.detach().clone() for p in strategy.module.parameters()]
        _window(strategy, w in OVERFLOWING, gen)
        stats = strategy.optimizer_step()
        assert stats.skipped == (w in OVERFLOWING), w
        # the LR this update used (or would have) is the schedule's at the applied count
        assert stats.lr == expected[applied], (w, applied)
        moved = any(not torch.equal(b, p) for b, p in zip(before, strategy.module.parameters()))
        assert moved != stats.skipped, w  # a skipped update leaves the weights alone
        applied += not stats.skipped
    assert applied == windows - len(OVERFLOWING) and strategy.skipped_steps == len(OVERFLOWING)
    assert strategy.optimizer.param_groups[0]["lr"] == expected[applied]
    assert strategy.scheduler.last_epoch == applied

    # the checkpoint keeps the schedule position and the skip count
    path = tmp_path / "ckpt.pt"
    strategy.save_checkpoint(path, {"loop": {}})
    again = _strategy()
    again.load_checkpoint(path)
    assert again.skipped_steps == len(OVERFLOWING)
    assert again.optimizer.param_groups[0]["lr"] == expected[applied]
    _window(again, True, gen)
    assert again.optimizer_step().skipped and again.skipped_steps == len(OVERFLOWING) + 1
    _window(again, False, gen)
    stats = again.optimizer_step()
    assert not stats.skipped and stats.lr == expected[applied]
    assert again.optimizer.param_groups[0]["lr"] == expected[applied + 1]


def test_huge_initial_loss_scale_overflows_until_it_backs_off() -> None:
    """A real overflow, not an injected inf: a 2**40 initial scale overflows the
    fp16 backward until GradScaler has halved it far enough; none of those
    windows moves the schedule."""
    strategy = _strategy()
    strategy.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    gen = torch.Generator().manual_seed(2)
    expected = _schedule_lrs(40)
    skipped = applied = 0
    for _ in range(40):
        _window(strategy, False, gen)
        stats = strategy.optimizer_step()
        assert stats.lr == expected[applied]
        skipped += stats.skipped
        applied += not stats.skipped
    assert skipped >= 5 and applied >= 5, (skipped, applied)  # both happened
    assert strategy.skipped_steps == skipped and strategy.scheduler.last_epoch == applied
    assert strategy.optimizer.param_groups[0]["lr"] == expected[applied]
