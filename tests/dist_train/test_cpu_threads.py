"""Each rank gets its share of the host's cores as intra-op threads (issue 16):
OpenMP threads that outnumber the cores spin against each other."""
from __future__ import annotations

import os

import pytest
import torch

from dist_train import distributed
from dist_train.config import ConfigError, load_config
from launch.env import LaunchEnv
from tests.conftest import REPO


def env(local_world: int, local_rank: int = 0) -> LaunchEnv:
    return LaunchEnv(kind="torchrun", rank=local_rank, local_rank=local_rank, world_size=local_world,
                     local_world_size=local_world, node_rank=0, master_addr="127.0.0.1", master_port=1)


@pytest.mark.parametrize("cores, ranks, expected", [(16, 2, 8), (16, 3, 5), (2, 2, 1), (2, 4, 1), (8, 1, 8)])
def test_share_of_the_usable_cores(monkeypatch, cores, ranks, expected):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    threads, why = distributed.pick_cpu_threads(env(ranks))
    assert threads == expected and f"{cores} usable cores / {ranks} rank(s)" in why


def test_omp_num_threads_is_kept_for_one_process_but_not_under_torchrun(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun exports for every rank it starts
    assert distributed.pick_cpu_threads(env(2))[0] == 8
    single = LaunchEnv(kind="single", rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
                       master_addr="127.0.0.1", master_port=0)
    assert distributed.pick_cpu_threads(single) == (1, "OMP_NUM_THREADS")


def test_configured_count_wins(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert distributed.pick_cpu_threads(env(2), 3) == (3, "dist.cpu_threads")


def test_init_applies_and_describes_the_choice(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    before = torch.get_num_threads()
    single = LaunchEnv(kind="single", rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
                       master_addr="127.0.0.1", master_port=0)
    monkeypatch.setattr(distributed, "pick_device", lambda e: torch.device("cpu"))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)  # no group needed for this check
    try:
        ctx = distributed.init(single, "gloo", 60)
        assert torch.get_num_threads() == 3
        # logged by the run once it starts (not before: a config error must stay one line)
        assert ctx.cpu_threads == "3 intra-op CPU thread(s) per rank (3 usable cores / 1 rank(s) on this host)"
    finally:
        torch.set_num_threads(before)


def test_a_run_logs_the_choice(tmp_path):
    import subprocess

    from tests.conftest import PYTHON, tiny_overrides

    proc = subprocess.run([PYTHON, str(REPO / "dist_train" / "main.py"), "--config", str(REPO / "configs" / "facecom.yaml"),
                           *tiny_overrides(tmp_path, train__max_steps=1), "dist.cpu_threads=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 intra-op CPU thread(s) per rank (dist.cpu_threads)" in proc.stdout + proc.stderr


def test_negative_count_is_a_config_error():
    with pytest.raises(ConfigError, match="dist.cpu_threads"):
        load_config(REPO / "configs" / "facecom.yaml", ["dist.cpu_threads=-1"])
