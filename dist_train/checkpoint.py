"""Checkpoint files: atomic writes, latest / best / top-k / periodic, safe loading.

The strategy decides what goes into a checkpoint and writes it (a file for
DDP, a directory for DeepSpeed); this module decides where, keeps the policy,
and makes every visible name appear atomically (write to a temp name, rename).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from shards.atomic import STALE_SUFFIX as _STALE
from shards.atomic import atomic_write  # the toolkit's one atomic writer; the rest of dist_train imports it here
from shards.atomic import move_into_place as _move_into_place
from shards.atomic import remove as _remove

# The names inside a run directory; nothing else in the toolkit spells them.
CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
MODEL_FILE = "model.pt"          # consolidated fp32 weights written at the end of a run
STAGING = ".staging"             # a checkpoint being written, before it is renamed to latest


def checkpoint_path(run_dir: Path, name: str = LATEST, suffix: str = ".pt") -> Path:
    """``run_dir/checkpoints/<name><suffix>`` (suffix ``""`` for DeepSpeed directories)."""
    return Path(run_dir) / CHECKPOINTS / f"{name}{suffix}"


def final_model_path(run_dir: Path) -> Path:
    return Path(run_dir) / MODEL_FILE


def is_run_dir(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CHECKPOINTS).is_dir()


def run_dir_of(path: Path) -> Path | None:
    """The run directory holding a checkpoint (the parent of its ``checkpoints/``
    folder), or None for a file that is not inside a run."""
    return next((q.parent for q in Path(path).resolve().parents if q.name == CHECKPOINTS), None)


def atomic_save(obj: Any, path: Path) -> None:
    def write(tmp: Path) -> None:
        # Through a Python file object: a failed write is then an OSError with
        # its errno (ENOSPC...), where torch.save(obj, path_string) only says
        # "basic_ios::clear: iostream error" or "unexpected pos".
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)

    atomic_write(path, write)


def safe_load(path: Path, map_location: Any = "cpu") -> Any:
    # Checkpoints are untrusted input: never unpickle arbitrary objects.
    return torch.load(path, map_location=map_location, weights_only=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` show ``src``'s content, atomically."""
    def write(tmp: Path) -> None:
        if src.is_dir():
            shutil.copytree(src, tmp)
            return
        try:
            os.link(src, tmp)  # cheap and atomic on one filesystem
        except OSError:
            shutil.copy2(src, tmp)

    atomic_write(dst, write)


_TORCH_WRITE_FAILURES = ("iostream error", "file write failed", "unexpected pos", "PytorchStreamWriter")


def as_write_error(exc: BaseException, path: Path) -> BaseException:
    """An ``OSError`` naming ``path`` for a failed checkpoint write; other
    exceptions unchanged. ``torch.save(obj, path_string)`` (what DeepSpeed's
    engine calls) reports a failed write as a RuntimeError without its cause;
    a full disk is by far the usual one, so it is named when the folder has
    (almost) no space left, else the write is reported as an I/O error."""
    if isinstance(exc, OSError):
        return OSError(exc.errno, exc.strerror or str(exc), str(path))
    if isinstance(exc, RuntimeError) and any(s in str(exc) for s in _TORCH_WRITE_FAILURES):
        code = errno.EIO
        with contextlib.suppress(OSError):
            if shutil.disk_usage(Path(path).parent).free < (1 << 20):
                code = errno.ENOSPC
        return OSError(code, os.strerror(code), str(path))
    return exc


# ---------------------------------------------------------------------------
# RNG state, stored as tensors and plain values so weights_only loading works.


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------


@dataclass
class CheckpointPolicy:
    monitor: str
    mode: str
    top_k: int
    every_steps: int
    # bookkeeping restored on resume
    best_value: float | None = None
    top: list[tuple[float, str]] = field(default_factory=list)

    def better(self, a: float, b: float | None) -> bool:
        return b is None or (a < b if self.mode == "min" else a > b)


class CheckpointManager:
    """Names and keeps checkpoints under ``run_dir/checkpoints``.

    - ``latest``: the most recent save (what ``--resume latest`` loads);
    - ``best``: best value of ``monitor`` so far;
    - ``topk/step_XXXXXXXX``: the ``top_k`` best validated saves;
    - ``periodic/step_XXXXXXXX``: every ``every_steps`` optimizer steps, and every
      save the caller marks ``periodic`` (the trainer: every N-th epoch end), kept.
    ``suffix`` is ``.pt`` for file checkpoints, empty for directory ones.
    """

    def __init__(self, ckpt_dir: Path, policy: CheckpointPolicy, is_main: bool, suffix: str = ".pt"):
        self.dir = ckpt_dir
        self.policy = policy
        self.is_main = is_main
        self.suffix = suffix
        if is_main:
            (self.dir / "topk").mkdir(parents=True, exist_ok=True)
            if policy.every_steps:
                (self.dir / "periodic").mkdir(parents=True, exist_ok=True)
            self.sweep()

    def sweep(self) -> None:
        """Remove the staging checkpoint and the temp files of a process killed
        while saving (nothing else writes here while this run's rank 0 lives),
        so they neither pile up nor survive a resume."""
        for folder in (self.dir, self.dir / "topk", self.dir / "periodic"):
            if not folder.is_dir():
                continue
            for leftover in folder.iterdir():
                if leftover.name.startswith(STAGING) or (leftover.name.startswith(".")
                                                         and _STALE.search(leftover.name)):
                    _remove(leftover)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}{self.suffix}"

    def save(self, write: Callable[[Path], None], step: int, metrics: dict[str, float] | None,
             periodic: bool = False) -> None:
        """``write(path)`` is called on every rank (DeepSpeed writes collectively);
        rank 0 then publishes the names. ``periodic``: keep this one under ``periodic/``
        whatever ``every_steps`` says."""
        staging = self.dir / f"{STAGING}{self.suffix}"
        latest = self.path(LATEST)
        if self.is_main:
            _remove(staging)
        try:
            write(staging)
        except (OSError, RuntimeError) as exc:
            if self.is_main:
                with contextlib.suppress(OSError):
                    _remove(staging)
            error = as_write_error(exc, latest)
            if error is exc:
                raise
            raise error from exc
        if not self.is_main:
            return
        _move_into_place(staging, latest)
        name = f"step_{step:08d}{self.suffix}"
        if periodic or (self.policy.every_steps and step % self.policy.every_steps == 0):
            _link_or_copy(latest, self.dir / "periodic" / name)
        value = None if metrics is None else metrics.get(self.policy.monitor)
        if value is None:
            return
        if self.policy.better(value, self.policy.best_value):
            self.policy.best_value = value
            _link_or_copy(latest, self.path(BEST))
        self._update_topk(latest, name, value)
        text = json.dumps({"monitor": self.policy.monitor, "mode": self.policy.mode,
                           "best": self.policy.best_value, "top_k": self.policy.top}, indent=1)
        atomic_write(self.dir / "best.json", lambda tmp: tmp.write_text(text))

    def _update_topk(self, latest: Path, name: str, value: float) -> None:
        top = self.policy.top + [(value, name)]
        top.sort(key=lambda t: t[0], reverse=self.policy.mode == "max")
        keep, drop = top[: self.policy.top_k], top[self.policy.top_k:]
        if any(n == name for _, n in keep):
            _link_or_copy(latest, self.dir / "topk" / name)
        for _, n in drop:
            _remove(self.dir / "topk" / n)
        self.policy.top = [(float(v), n) for v, n in keep]

    def policy_state(self) -> dict[str, Any]:
        return {"best_value": self.policy.best_value, "top": [list(t) for t in self.policy.top]}

    def load_policy_state(self, state: dict[str, Any]) -> None:
        self.policy.best_value = state.get("best_value")
        self.policy.top = [(float(v), str(n)) for v, n in state.get("top", [])]
