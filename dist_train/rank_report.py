"""Where each rank runs, and how long its steps take: what a user needs to find
a misconfigured interface or a straggling host in a multi-node run.

- :func:`describe_this_rank`: host, and the interface and address the
  collectives use (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` when set);
  rank 0 logs every rank's line once at the start.
- :func:`weights_digest`: after a DDP run every rank's parameters must be equal;
  rank 0 logs whether they are.
- :class:`StepTimer`: each rank's *own* time per optimizer step. A step's
  wall time is the same on every rank (the gradient all-reduce waits for the
  slowest), so the timer has the ranks meet before each step and subtracts
  the time a rank waited there: what remains is the time that rank itself
  took (loading, computing, anything it did alone), and the slowest rank is the
  one with the largest value. A wait inside the gradient all-reduce (a rank
  computing slower during backward) still lands in every rank's own time.
- :class:`LoaderWait`: how long the training loop sat blocked on its loader
  (open_clip's ``data_time`` beside ``batch_time``): a starved accelerator
  shows as a large fraction of the step, without a profiler.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

from launch.netif import interface_address

log = logging.getLogger("biomtl")

STRAGGLER_RATIO = 1.5  # a rank this much slower than the median (and > STRAGGLER_MIN_S more) is named
STRAGGLER_MIN_S = 0.05


def describe_this_rank(backend: str) -> str:
    var = "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"
    ifname = os.environ.get(var, "")
    where = f"host {socket.gethostname()}"
    if os.environ.get("SLURMD_NODENAME"):  # several SLURM nodes may share a host name (containers, namespaces)
        where += f" (SLURM node {os.environ['SLURMD_NODENAME']})"
    if ifname and not ifname.startswith("^") and "," not in ifname:
        return f"{where}, {var}={ifname} ({interface_address(ifname) or 'no IPv4 address'})"
    return f"{where}, {var} {'=' + ifname if ifname else 'unset'} (the backend picks the interface)"


class StepTimer:
    """Per-rank own time per step (see the module doc); a no-op in a world of one."""

    def __init__(self, device: torch.device, rank: int, world_size: int):
        self.device, self.rank, self.world_size = device, rank, world_size
        self.waited = 0.0

    def meet(self) -> None:
        """All ranks meet here (before each optimizer step's first micro-batch)."""
        if self.world_size == 1:
            return
        started = time.perf_counter()
        token = torch.zeros(1, device=self.device)
        dist.all_reduce(token)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.waited += time.perf_counter() - started

    def per_rank(self, seconds: float, steps: int) -> list[float]:
        """Every rank's own seconds per step over an interval of ``seconds``
        wall time and ``steps`` steps (a collective); restarts the count."""
        own = max(seconds - self.waited, 0.0) / max(steps, 1)
        self.waited = 0.0
        if self.world_size == 1:
            return [own]
        times = torch.zeros(self.world_size, dtype=torch.float64, device=self.device)
        times[self.rank] = own
        dist.all_reduce(times)
        return times.cpu().tolist()


class LoaderWait:
    """Seconds spent blocked in ``next`` on a loader, summed until :meth:`take`.

    Host time only, with no synchronisation of its own: on CUDA the loop reads
    every micro-batch's loss as a Python float (which waits for the queued
    forward and backward) before it asks for the next batch, so the time
    measured here is the loader's, not kernels still running."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        it = iter(loader)
        while True:
            started = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - started
            yield batch

    def take(self) -> float:
        """The seconds waited since the last call; restarts the count."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def weights_digest(module: torch.nn.Module) -> str:
    """A short digest of a module's parameters, computed where they live (sum
    and absolute sum of each tensor in float64): equal weights give equal
    digests on every rank of a data-parallel run. Buffers are left out: batch
    norm statistics follow each rank's own batches (DDP broadcasts rank 0's at
    the next forward), and so are rows each rank holds of a sharded head
    (:mod:`dist_train.row_shards`: different by design)."""
    import hashlib

    from models.partial_fc import row_shard_of

    with torch.no_grad():
        tensors = [t for t in module.parameters() if t.numel() and row_shard_of(t) is None]
        sums = torch.stack([torch.stack([t.double().sum(), t.double().abs().sum()]) for t in tensors])
    return hashlib.sha256(sums.cpu().numpy().tobytes()).hexdigest()[:16]


def straggler(per_rank: list[float]) -> int | None:
    """The rank that is clearly slower than the others, else None."""
    if len(per_rank) < 2:
        return None
    ordered = sorted(per_rank)
    median = ordered[(len(ordered) - 1) // 2]  # lower median: with two ranks, the faster one
    slowest = max(range(len(per_rank)), key=per_rank.__getitem__)
    worst = per_rank[slowest]
    return slowest if worst > STRAGGLER_RATIO * median and worst - median > STRAGGLER_MIN_S else None
