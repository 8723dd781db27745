"""Where a process learns its place in the job, in one place.

Three ways to start, checked in this order:

- torchrun (also under ``srun``, one agent per node: ``slurm/train.sh``) sets
  RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR and
  MASTER_PORT; those win;
- ``srun`` without torchrun (``srun -n 8 python dist_train/main.py ...``): a
  task of a job *step* (SLURM_STEP_ID set) reads SLURM_PROCID, SLURM_LOCALID,
  SLURM_NODEID, SLURM_STEP_NUM_TASKS and the tasks on its node; the master is
  the step's first host and the port is derived from the job id (an explicit
  MASTER_ADDR / MASTER_PORT wins);
- anything else (a plain ``python`` run, or the batch script itself, which
  has SLURM_NTASKS but is no step: ENVIRONMENT=BATCH without SLURM_STEP_ID)
  is a world of one.

Also here: whether this process is a restarted attempt (torchrun restarted
the worker group, or SLURM requeued the job) and the id that the attempts of
one launch share, which the entry point uses to find the first attempt's run
directory and resume by itself.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Literal, Mapping


@dataclass(frozen=True)
class LaunchEnv:
    kind: Literal["torchrun", "slurm", "single"]
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def slurm_port(job_id: str | int) -> int:
    """A port derived from the job id, so concurrent jobs sharing a node differ."""
    return 20000 + int(job_id) % 20000


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list, via scontrol when present.

    The fallback parser handles the common forms ``n1,n2``, ``gpu[03-05,7]``
    and ``a-[1-2],b``; scontrol knows every form."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        return nodelist
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tasks_on_node(spec: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from SLURM's compressed form, e.g. ``2(x3),1``."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise ValueError(f"cannot parse SLURM tasks per node: {spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[min(node_id, len(counts) - 1)]


def restart_count(environ: Mapping[str, str] | None = None) -> int:
    """How many times this launch was restarted so far: torchrun's worker-group
    restarts plus SLURM requeues (0 on the first attempt)."""
    env = os.environ if environ is None else environ
    return int(env.get("TORCHELASTIC_RESTART_COUNT") or 0) + int(env.get("SLURM_RESTART_COUNT") or 0)


def launch_id(environ: Mapping[str, str] | None = None) -> str | None:
    """An id shared by every attempt of one launch (the SLURM job and/or the
    torchrun rendezvous id); None for a plain process."""
    env = os.environ if environ is None else environ
    parts = []
    if env.get("SLURM_JOB_ID"):
        parts.append(f"slurm-{env['SLURM_JOB_ID']}")
    if env.get("TORCHELASTIC_RUN_ID"):
        parts.append(f"torchrun-{env['TORCHELASTIC_RUN_ID']}")
    return "/".join(parts) or None


def in_slurm_step(env: Mapping[str, str]) -> bool:
    """A task started by ``srun``, not the batch script's own process: sbatch
    sets ENVIRONMENT=BATCH (inherited by steps) and srun sets SLURM_STEP_ID."""
    if "SLURM_PROCID" not in env:
        return False
    return "SLURM_STEP_ID" in env or "SLURM_STEPID" in env or env.get("ENVIRONMENT") != "BATCH"


def detect(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        return LaunchEnv(
            kind="torchrun",
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=world,
            local_world_size=local_world,
            node_rank=int(env.get("GROUP_RANK", int(env["RANK"]) // max(local_world, 1))),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if in_slurm_step(env) and world > 1:
        node_id = int(env.get("SLURM_NODEID", 0))
        if env.get("SLURM_NTASKS_PER_NODE"):
            local_world = int(env["SLURM_NTASKS_PER_NODE"])
        else:
            local_world = tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE")
                                        or env.get("SLURM_TASKS_PER_NODE", "1"), node_id)
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        return LaunchEnv(
            kind="slurm",
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=world,
            local_world_size=local_world,
            node_rank=node_id,
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodes),
            master_port=int(env.get("MASTER_PORT") or slurm_port(env.get("SLURM_JOB_ID", 0))),
        )
    return LaunchEnv(kind="single", rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
                     master_addr="127.0.0.1", master_port=free_port())
