"""Process-group lifetime: pick backend and device, init with a timeout, shut down cleanly."""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from launch.env import LaunchEnv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    env: LaunchEnv
    device: torch.device
    backend: str
    cpu_threads: str = ""  # the intra-op thread choice, logged once the run starts

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.is_main


def check_backend_here(backend: str) -> None:
    """``dist.backend=nccl`` where this node shows no GPU (e.g.
    ``configs/dcal_twins/multi_node.yaml`` on a CPU box): one line naming the
    node, before any process group (whose init would fail with a traceback on
    every rank, or wait for the others). Checked on the rank's own host, not in
    the preflight: ``biomtl launch --slurm`` may submit from a
    login node without GPUs onto GPU nodes."""
    import socket

    from dist_train.config import ConfigError

    if backend == "nccl" and not torch.cuda.is_available():
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        raise ConfigError(f"dist.backend=nccl needs CUDA GPUs and node {node} has none visible "
                          "(set dist.backend=gloo or auto, or ask for GPUs: sbatch --gpus-per-node=N)")


def pick_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def pick_device(env: LaunchEnv) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: cgroups/taskset/srun --cpus-per-task)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pick_cpu_threads(env: LaunchEnv, requested: int = 0) -> tuple[int, str]:
    """Intra-op threads for this rank and why: ``requested`` when > 0, else its share
    of the host's cores (torchrun's own default is 1 thread per rank when it starts
    several, whatever the core count)."""
    if requested > 0:
        return requested, "dist.cpu_threads"
    # One process not started by a launcher: OMP_NUM_THREADS is the user's own choice
    # (torchrun sets it to 1 for every rank it starts, so there it says nothing).
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if env.kind == "single" and omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    cores, ranks = usable_cores(), max(1, env.local_world_size)
    return max(1, cores // ranks), f"{cores} usable cores / {ranks} rank(s) on this host"


def init(env: LaunchEnv, backend: str = "auto", timeout_s: int = 1800, cpu_threads: int = 0) -> DistContext:
    """Join (or, for one process, create) the process group.

    A world of one still gets a real group so that collectives used by the
    trainer and recipes (all_gather_object, barrier) work unchanged."""
    backend = pick_backend(backend)
    check_backend_here(backend)  # (main.run asks before this too, before any file is touched)
    device = pick_device(env)
    threads, why = pick_cpu_threads(env, cpu_threads)
    torch.set_num_threads(threads)
    os.environ["MASTER_ADDR"] = env.master_addr
    os.environ["MASTER_PORT"] = str(env.master_port)
    # Fail a hung collective instead of waiting forever; NCCL needs async error
    # handling for the timeout to fire.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(backend=backend, init_method="env://", rank=env.rank,
                                world_size=env.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistContext(env=env, device=device, backend=backend,
                       cpu_threads=f"{threads} intra-op CPU thread(s) per rank ({why})")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@contextlib.contextmanager
def process_group(env: LaunchEnv, backend: str, timeout_s: int,
                  reported: tuple[type[BaseException], ...] = (), cpu_threads: int = 0) -> Iterator[DistContext]:
    """Init, run, and always tear the group down.

    On an exception the rank logs it with its number and re-raises (except the
    ``reported`` types, which the caller reports in one line itself); the
    launcher (torchrun / srun --kill-on-bad-exit) then stops the other ranks,
    and the collective timeout ends any rank still blocked in a collective."""
    ctx = init(env, backend, timeout_s, cpu_threads)
    try:
        yield ctx
    except BaseException as exc:
        if not isinstance(exc, reported):
            log.exception("rank %d failed", env.rank)
        raise
    finally:
        shutdown()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
