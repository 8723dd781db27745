"""Unit tests of the trainer's parts: schedules, checkpoint policy, early stopping, launch env."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dist_train.checkpoint import CheckpointManager, CheckpointPolicy, rng_state, safe_load, set_rng_state
from dist_train.config import SchedulerConfig
from dist_train.run_logging import CsvLog
from dist_train.schedulers import build_scheduler
from dist_train.trainer import EarlyStopping, LoopState
from launch.env import detect, first_slurm_host, slurm_port
from tests.tolerance import ops_rtol


# A schedule value (base LR 1) is a few float64 operations and at most one cosine on terms whose
# |values| add up to <= 2, ordered otherwise than the formula written here (1 + cos cancels near
# the end of a cosine, so an absolute bound): ~4e-15; approx's default rel 1e-6 would hide a
# wrong constant in the 7th digit.
SCHEDULE_ATOL = 2 * ops_rtol(8, 1, dtype=torch.float64)


def _lrs(cfg: SchedulerConfig, total: int, lr: float = 1.0) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_scheduler(cfg, opt, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_cosine_shape() -> None:
    lrs = _lrs(SchedulerConfig(name="warmup_cosine", warmup_steps=4, min_lr_ratio=0.1), 20)
    assert lrs[0] == pytest.approx(1 / 5, rel=0, abs=SCHEDULE_ATOL)
    assert lrs[3] == pytest.approx(4 / 5, rel=0, abs=SCHEDULE_ATOL)
    assert lrs[4] == pytest.approx(1.0, rel=0, abs=SCHEDULE_ATOL)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # monotone decay after warmup
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)), rel=0, abs=SCHEDULE_ATOL)


def test_warmup_poly_reaches_min() -> None:
    lrs = _lrs(SchedulerConfig(name="warmup_poly", warmup_steps=2, power=2.0, min_lr_ratio=0.0), 12)
    assert lrs[2] == pytest.approx(1.0, rel=0, abs=SCHEDULE_ATOL)
    assert lrs[7] == pytest.approx((1 - 5 / 10) ** 2, rel=0, abs=SCHEDULE_ATOL)


def test_cosine_restarts_restart() -> None:
    lrs = _lrs(SchedulerConfig(name="cosine_restarts", restart_period=5), 15)
    assert [lrs[0], lrs[5], lrs[10]] == pytest.approx([1.0] * 3, rel=0, abs=SCHEDULE_ATOL)
    assert lrs[4] < 0.2


def test_scheduler_state_round_trip_is_weights_only_loadable(tmp_path: Path) -> None:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(SchedulerConfig(name="cosine_restarts", warmup_steps=3, restart_period=4), opt, 20)
    for _ in range(6):
        opt.step()
        sched.step()
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_scheduler(SchedulerConfig(name="cosine_restarts", warmup_steps=3, restart_period=4), opt2, 20)
    sched2.load_state_dict(safe_load(tmp_path / "s.pt"))
    for _ in range(3):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]     # same state, same arithmetic: exact


def test_checkpoint_manager_keeps_best_topk_and_periodic(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, CheckpointPolicy("acc", "max", top_k=2, every_steps=2), is_main=True)
    for step, acc in [(1, 0.5), (2, 0.7), (3, 0.6), (4, 0.9), (5, None)]:
        manager.save(lambda p, s=step: torch.save({"step": s}, p), step, None if acc is None else {"acc": acc})
    assert safe_load(tmp_path / "latest.pt")["step"] == 5
    assert safe_load(tmp_path / "best.pt")["step"] == 4
    assert sorted(p.name for p in (tmp_path / "topk").iterdir()) == ["step_00000002.pt", "step_00000004.pt"]
    assert sorted(p.name for p in (tmp_path / "periodic").iterdir()) == ["step_00000002.pt", "step_00000004.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_rng_state_round_trip_through_weights_only(tmp_path: Path) -> None:
    import random

    import numpy as np

    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(safe_load(tmp_path / "rng.pt"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_early_stopping_waits_for_all_metrics() -> None:
    stopper = EarlyStopping(["loss", "acc"], ["min", "max"], patience=2, min_delta=0.0, state=LoopState())
    assert not stopper.update({"loss": 1.0, "acc": 0.5})
    assert not stopper.update({"loss": 1.1, "acc": 0.6})  # acc improved
    assert not stopper.update({"loss": 1.2, "acc": 0.6})
    assert stopper.update({"loss": 1.0, "acc": 0.55})
    with pytest.raises(KeyError, match="no validation metric 'acc'"):
        stopper.update({"loss": 1.0})


def test_csv_log_truncates_on_resume(tmp_path: Path) -> None:
    log = CsvLog(tmp_path / "t.csv")
    for step in range(1, 6):
        log.append({"step": step, "loss": 1.0 / step})
    resumed = CsvLog(tmp_path / "t.csv")
    resumed.truncate_after(3)
    resumed.append({"step": 4, "loss": 0.25, "extra": 1})
    text = (tmp_path / "t.csv").read_text().splitlines()
    assert text[0] == "step,loss,extra"
    assert [line.split(",")[0] for line in text[1:]] == ["1", "2", "3", "4"]


def test_launch_env_detection() -> None:
    torchrun = detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                       "GROUP_RANK": "1", "MASTER_ADDR": "h1", "MASTER_PORT": "1234"})
    assert (torchrun.kind, torchrun.rank, torchrun.local_rank, torchrun.node_rank) == ("torchrun", 3, 1, 1)
    slurm = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
                    "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_NODELIST": "gpu[03-05]", "SLURM_JOB_ID": "777"})
    assert (slurm.kind, slurm.rank, slurm.world_size, slurm.master_port) == ("slurm", 5, 8, slurm_port(777))
    assert slurm.master_addr.endswith("03") or slurm.master_addr == "gpu03"
    assert detect({}).kind == "single"
    assert first_slurm_host("node7,node8") in ("node7",)


def test_validation_points_for_a_fraction_of_an_epoch() -> None:
    from types import SimpleNamespace

    from dist_train.trainer import Trainer

    fake = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(val_every_steps=0, val_every_epochs=0.25)),
                           steps_per_epoch=10, total_steps=20)
    assert sorted(Trainer._validation_steps(fake)) == [3, 5, 8, 10, 13, 15, 18, 20]
    fake.cfg.train.val_every_steps = 7
    assert sorted(Trainer._validation_steps(fake)) == [7, 14]


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_ddp_strategy_steps_in_every_precision_on_cpu(precision: str) -> None:
    from dist_train.precision import Precision
    from dist_train.strategies.base import StrategyOptions
    from dist_train.strategies.ddp import DDPStrategy

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, batch):
            loss = torch.nn.functional.cross_entropy(self.lin(batch["x"]), batch["y"])
            return {"loss": loss, "terms": {"ce": loss.detach()}}

    torch.manual_seed(0)
    model = Tiny()
    before = model.lin.weight.detach().clone()
    strategy = DDPStrategy(model, torch.device("cpu"), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                           lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                           StrategyOptions(Precision(precision, "cpu"), grad_clip=1.0))
    batch = {"x": torch.randn(8, 4), "y": torch.randint(0, 2, (8,))}
    out = strategy.micro_step(batch, 1.0, boundary=True)
    stats = strategy.optimizer_step()
    assert torch.isfinite(out["loss"]) and not stats.skipped
    assert strategy.scaler.is_enabled() == (precision == "fp16")
    assert not torch.equal(before, model.lin.weight)
    assert 0 < stats.grad_norm < float("inf")
