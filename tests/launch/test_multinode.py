"""Where ranks come from (launch/env.py), what ``biomtl launch`` runs, and two
torchrun agents (two "nodes") meeting by c10d rendezvous on loopback."""
from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_train.checkpoint import safe_load
from dist_train.commands import launch_cmd
from launch import cli as launch_cli
from launch.env import detect, first_slurm_host, free_port, launch_id, restart_count, slurm_port, tasks_on_node
from tests.conftest import PYTHON, REPO, tiny_overrides

CONFIG = REPO / "configs" / "facecom.yaml"
DCAL = REPO / "configs" / "dcal_twins.yaml"


# ---------------------------------------------------------------------------
# launch/env.py: the three paths.


def test_env_torchrun() -> None:
    e = detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
                "MASTER_ADDR": "h1", "MASTER_PORT": "1234",
                # torchrun under srun: torchrun's variables win over SLURM's
                "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"})
    assert (e.kind, e.rank, e.local_rank, e.world_size, e.local_world_size, e.node_rank) == \
        ("torchrun", 3, 1, 4, 2, 1)
    assert (e.master_addr, e.master_port, e.is_main, e.is_local_main) == ("h1", 1234, False, False)


def test_env_srun_step_without_torchrun() -> None:
    env = {"SLURM_JOB_ID": "777", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "2", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "7",
           "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_STEP_NODELIST": "gpu[03-05,09]",
           "SLURM_JOB_NODELIST": "gpu[01-09]", "ENVIRONMENT": "BATCH"}  # srun inside a batch script
    e = detect(env)
    assert (e.kind, e.rank, e.local_rank, e.world_size, e.local_world_size, e.node_rank) == \
        ("slurm", 5, 1, 7, 2, 2)
    assert (e.master_addr, e.master_port) == ("gpu03", slurm_port(777)) and slurm_port(777) == 20777
    e = detect({**env, "SLURM_NODEID": "3", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4000"})
    assert (e.local_world_size, e.master_addr, e.master_port) == (1, "10.0.0.1", 4000)


def test_env_slurm_batch_script_and_plain_process_are_one_rank() -> None:
    # The batch script has SLURM_NTASKS of the allocation but is no srun step:
    # a python started there must not wait for 7 ranks that never come.
    batch = detect({"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "n1",
                    "ENVIRONMENT": "BATCH"})
    plain = detect({})
    for e in (batch, plain):
        assert (e.kind, e.rank, e.world_size, e.local_world_size, e.master_addr) == ("single", 0, 1, 1, "127.0.0.1")
        assert 0 < e.master_port < 65536
    one_task = detect({"SLURM_JOB_ID": "9", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert one_task.kind == "single"


def test_env_helpers() -> None:
    assert [tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]
    assert tasks_on_node("8", 0) == 8
    with pytest.raises(ValueError):
        tasks_on_node("2(y3)", 0)
    assert first_slurm_host("node7,node8") == "node7"
    assert first_slurm_host("gpu[03-05,7]") in ("gpu03",)
    assert restart_count({}) == 0
    assert restart_count({"TORCHELASTIC_RESTART_COUNT": "2", "SLURM_RESTART_COUNT": "1"}) == 3
    assert launch_id({}) is None
    assert launch_id({"SLURM_JOB_ID": "5", "TORCHELASTIC_RUN_ID": "5"}) == "slurm-5/torchrun-5"
    assert launch_id({"TORCHELASTIC_RUN_ID": "abc"}) == "torchrun-abc"
    assert free_port() != free_port() or True  # any free port; mostly a smoke test


# ---------------------------------------------------------------------------
# biomtl launch --dry-run: the exact commands.


def _dry(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    assert launch_cmd.run([*argv, "--dry-run"]) == 0
    return shlex.split(capsys.readouterr().out.strip())


def test_launch_one_node_is_standalone(capsys: pytest.CaptureFixture[str]) -> None:
    words = _dry(capsys, "--config", str(CONFIG), "--nproc-per-node", "2", "train.lr=3e-4",
                 "experiment.name=a b")
    assert words[0] == "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
    assert words[1:] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                         "--nproc-per-node=2", "--max-restarts=0", str(REPO / "dist_train" / "main.py"),
                         "--config", str(CONFIG), "train.lr=3e-4", "experiment.name=a b"]


def test_launch_several_nodes_use_c10d(capsys: pytest.CaptureFixture[str]) -> None:
    """One command per kind of host: the rendezvous host is told it hosts the
    store (torchrun's own guess compares hostnames, wrong where the name does
    not resolve to the endpoint's address); the others are not."""
    assert launch_cmd.run(["--config", str(CONFIG), "--nnodes", "2", "--rdzv-endpoint", "host0:29400",
                           "--nproc-per-node", "4", "--max-restarts", "3", "--resume", "latest", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.startswith("#") for line in lines] == [True, False, True, False]
    assert "rendezvous host (host0)" in lines[0] and "other 1 host" in lines[2]
    head, other = shlex.split(lines[1]), shlex.split(lines[3])
    for words in (head, other):
        assert words[1:8] == [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--rdzv-backend=c10d",
                              "--rdzv-endpoint=host0:29400", "--rdzv-id=biomtl-facecom"]
        assert words[-2:] == ["--resume", "latest"]
    # each host advertises its own address (rank 0's becomes the workers' MASTER_ADDR)
    assert head[8:12] == ["--rdzv-conf=is_host=true", "--local-addr=host0", "--nproc-per-node=4",
                          "--max-restarts=3"]
    assert other[8:11] == ["--local-addr=ADDR", "--nproc-per-node=4", "--max-restarts=3"]
    assert "ADDR its own address" in lines[2]


def test_launch_knows_when_it_hosts_the_rendezvous() -> None:
    """An address of this host (not loopback) whose port is free: host it; a
    name that does not resolve, loopback (torchrun's own first-come choice) or
    a port already served: do not. (An address of another host: in
    tests/launch/test_two_hosts.py, where there is one.)"""
    import socket

    assert not launch_cli.hosts_rendezvous("127.0.0.1:29400")
    assert not launch_cli.hosts_rendezvous("no-such-host.invalid:29400")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("198.51.100.1", 9))  # no packet sent: asks the routing table for our address
            addr = probe.getsockname()[0]
        except OSError:
            pytest.skip("no route off this host: no non-loopback address to try")
    with socket.socket() as busy:
        busy.bind((addr, 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert not launch_cli.hosts_rendezvous(f"{addr}:{port}")
    assert launch_cli.hosts_rendezvous(f"{addr}:{port}")


def test_launch_slurm_submits_the_recipe_script(capsys: pytest.CaptureFixture[str]) -> None:
    words = _dry(capsys, "--config", str(DCAL), "--slurm", "--nnodes", "2", "--gpus-per-node", "4",
                 "--nproc-per-node", "4", "--max-restarts", "1", "--sbatch-arg=--partition=gpu", "train.epochs=2")
    env = dict(w.split("=", 1) for w in words[:3])
    assert env == {"BIOMTL_REPO": str(REPO), "BIOMTL_NPROC_PER_NODE": "4", "BIOMTL_MAX_RESTARTS": "1"}
    cmd = words[3:]
    assert cmd[:4] == ["sbatch", "--nodes=2", "--gpus-per-node=4", "--partition=gpu"]
    assert Path(cmd[4]).resolve() == REPO / "slurm" / "dcal.sh"
    assert cmd[5:] == ["--config", str(DCAL), "train.epochs=2"]
    words = _dry(capsys, "--config", str(CONFIG), "--slurm")
    assert words[1:3] == ["sbatch", "--nodes=1"] and Path(words[3]).resolve() == REPO / "slurm" / "facecom.sh"


def test_launch_slurm_script_choice(tmp_path: Path) -> None:
    for name in ("train.sh", "dcal.sh", "face.sh", "facecom.sh"):
        (tmp_path / name).write_text("#!/bin/bash\n")
    assert launch_cli.slurm_script("dcal_twins", tmp_path).name == "dcal.sh"
    assert launch_cli.slurm_script("facecom", tmp_path).name == "facecom.sh"
    assert launch_cli.slurm_script("facecomplus", tmp_path).name == "facecom.sh"  # the longest prefix
    assert launch_cli.slurm_script("ears", tmp_path).name == "train.sh"


def test_launch_refuses_mistakes_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch_cmd.run(["--config", str(CONFIG), "train.bogus=1", "--dry-run"]) == 2
    assert "train.bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        launch_cmd.run(["--config", str(CONFIG), "--nnodes", "2", "--dry-run"])
    assert exc.value.code == 2 and "--rdzv-endpoint" in capsys.readouterr().err


def test_biomtl_cli_lists_launch() -> None:
    proc = subprocess.run([PYTHON, "-m", "dist_train.cli", "--help"], capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert "launch" in proc.stdout


# ---------------------------------------------------------------------------
# Two nodes on one machine.


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.integration
def test_two_nodes_c10d_rendezvous_on_loopback(tmp_path: Path) -> None:
    """The command ``biomtl launch --nnodes 2`` runs, started twice as on two
    hosts: each agent in its own working directory, one rank each, rendezvous on
    127.0.0.1. They train to the end as one world of 2; only the rank-0 node logs
    and writes TensorBoard. (The launch command is built in-process: a launcher
    process per node would only add another torch import to a slow test.)"""
    port = free_port()
    overrides = tiny_overrides(tmp_path, train__max_steps=3, train__val_every_steps=3)  # absolute paths
    args = launch_cli.build_arg_parser("biomtl launch").parse_intermixed_args(
        ["--config", str(CONFIG), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}",
         "--rdzv-id", "two-nodes", *overrides])
    cmd = launch_cli.torchrun_command(args, str(CONFIG), python=PYTHON)
    assert "--rdzv-backend=c10d" in cmd and "--nnodes=2" in cmd and "--standalone" not in cmd
    env = {**os.environ, **launch_cli.RESTART_ENV, "OMP_NUM_THREADS": "1"}
    agents = []
    for node in ("node_a", "node_b"):
        cwd = tmp_path / node
        cwd.mkdir()
        out = (tmp_path / f"{node}.log").open("w")
        agents.append((node, cwd, subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)))
        out.close()
    deadline = time.monotonic() + 300
    codes = {}
    for node, _, proc in agents:
        try:
            codes[node] = proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for _, _, p in agents:
                p.kill()
            raise
    logs = {node: (tmp_path / f"{node}.log").read_text(errors="replace") for node, _, _ in agents}
    assert codes == {"node_a": 0, "node_b": 0}, "\n".join(f"--- {n}\n{t[-4000:]}" for n, t in logs.items())
    # Exactly one node hosted rank 0 (c10d decides which): it alone logged the run.
    main_nodes = [n for n, t in logs.items() if "run directory:" in t]
    assert len(main_nodes) == 1, logs
    assert "world size 2" in logs[main_nodes[0]]
    for _, cwd, _ in agents:
        assert list(cwd.iterdir()) == []  # nothing written relative to either node's cwd
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert [int(r["step"]) for r in _rows(run / "logs" / "train_logs.csv")] == [1, 2, 3]  # each step once
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1  # one writer
    ckpt = safe_load(run / "checkpoints" / "latest.pt")
    assert ckpt["client"]["loop"]["step"] == 3
    assert len(ckpt["client"]["rng"]) == 2  # both ranks took part
    assert (run / "launch_id").read_text().strip() == "torchrun-two-nodes"
