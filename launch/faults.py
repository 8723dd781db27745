"""Test-only fault injection, driven by environment variables (unset: nothing happens).

``dist_train/main.py`` hands :func:`hook_from_env` to the trainer, which calls
the hook after each optimizer step (after that step's checkpoint, if any); it
lets the tests kill or break one rank at a known point, deterministically:

- ``BIOMTL_FAULT_KILL_AT_STEP=K``: the fault rank SIGKILLs itself after step K,
  on the first attempt only (``TORCHELASTIC_RESTART_COUNT`` 0), so a restarted
  group runs through;
- ``BIOMTL_FAULT_RAISE_AT_STEP=K``: the fault rank raises ``RuntimeError``
  after step K, on every attempt;
- ``BIOMTL_FAULT_RANK`` (default 1): which global rank misbehaves;
- ``BIOMTL_FAULT_SLEEP_S=S``: every rank whose environment has it sleeps S
  seconds after each step (a slow host: set it in one host's environment
  only; c10d, not the test, decides which ranks that host gets).
"""
from __future__ import annotations

import os
import signal
import time
from typing import Callable

from launch.env import restart_count


class InjectedFault(RuntimeError):
    pass


def hook_from_env() -> Callable[[int, int], None] | None:
    """:func:`after_step` when a ``BIOMTL_FAULT_*`` variable is set, else None."""
    env = os.environ
    faults = ("BIOMTL_FAULT_KILL_AT_STEP", "BIOMTL_FAULT_RAISE_AT_STEP", "BIOMTL_FAULT_SLEEP_S")
    return after_step if any(env.get(name) for name in faults) else None


def after_step(step: int, rank: int) -> None:
    env = os.environ
    kill_at = int(env.get("BIOMTL_FAULT_KILL_AT_STEP") or 0)
    raise_at = int(env.get("BIOMTL_FAULT_RAISE_AT_STEP") or 0)
    if env.get("BIOMTL_FAULT_SLEEP_S"):
        time.sleep(float(env["BIOMTL_FAULT_SLEEP_S"]))
    if not (kill_at or raise_at) or rank != int(env.get("BIOMTL_FAULT_RANK") or 1):
        return
    if kill_at and step == kill_at and restart_count() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    if raise_at and step == raise_at:
        raise InjectedFault(f"BIOMTL_FAULT_RAISE_AT_STEP: injected failure on rank {rank} after step {step}")
