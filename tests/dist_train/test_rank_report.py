"""dist_train/rank_report.py without processes: who is a straggler, the
per-rank own step time of one rank, the weights digest and the interface
address; plus the slow-host fault hook of launch/faults.py."""
from __future__ import annotations

import time

import pytest
import torch

from dist_train import rank_report
from launch import faults


def test_straggler_needs_a_clear_margin() -> None:
    assert rank_report.straggler([0.10, 0.70]) == 1
    assert rank_report.straggler([0.70, 0.10, 0.11, 0.10]) == 0
    assert rank_report.straggler([0.10, 0.14]) is None  # within 1.5x
    assert rank_report.straggler([0.010, 0.040]) is None  # 4x, but only 30 ms
    assert rank_report.straggler([0.5]) is None


def test_step_timer_one_rank_is_wall_time_per_step() -> None:
    timer = rank_report.StepTimer(torch.device("cpu"), 0, 1)
    timer.meet()  # no-op alone
    assert timer.per_rank(3.0, 6) == [0.5]
    timer.waited = 1.0  # time spent waiting for the others is not this rank's own
    assert timer.per_rank(3.0, 4) == [0.5] and timer.waited == 0.0


def test_weights_digest_follows_parameters_not_buffers() -> None:
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    b = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    b.load_state_dict(a.state_dict())
    assert rank_report.weights_digest(a) == rank_report.weights_digest(b)
    b[1].running_mean += 1  # per-rank statistics: not a divergence
    assert rank_report.weights_digest(a) == rank_report.weights_digest(b)
    with torch.no_grad():
        b[0].weight[0, 0] += 1e-3
    assert rank_report.weights_digest(a) != rank_report.weights_digest(b)


def test_describe_this_rank_names_interface_and_address(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rank_report.interface_address("lo") == "127.0.0.1"
    assert rank_report.interface_address("no-such-if0") is None
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    assert "GLOO_SOCKET_IFNAME=lo (127.0.0.1)" in rank_report.describe_this_rank("gloo")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    assert "GLOO_SOCKET_IFNAME unset" in rank_report.describe_this_rank("gloo")


def test_fault_sleep_slows_every_step_of_the_ranks_that_have_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BIOMTL_FAULT_KILL_AT_STEP", "BIOMTL_FAULT_RAISE_AT_STEP", "BIOMTL_FAULT_SLEEP_S"):
        monkeypatch.delenv(name, raising=False)
    assert faults.hook_from_env() is None
    monkeypatch.setenv("BIOMTL_FAULT_SLEEP_S", "0.2")
    hook = faults.hook_from_env()
    assert hook is not None
    started = time.monotonic()
    hook(1, 0)  # any rank: the variable is set on the slow host only
    assert time.monotonic() - started >= 0.2


def test_describe_this_rank_names_the_slurm_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes in containers or namespaces may share one hostname: the SLURM node name tells them apart."""
    monkeypatch.setenv("SLURMD_NODENAME", "bmn2")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    assert "(SLURM node bmn2), GLOO_SOCKET_IFNAME=lo (127.0.0.1)" in rank_report.describe_this_rank("gloo")
    monkeypatch.delenv("SLURMD_NODENAME")
    assert "SLURM node" not in rank_report.describe_this_rank("gloo")
