"""Checkpoint files: atomic writes, latest / best / top-k / periodic, safe loading.

The strategy decides what goes into a checkpoint and writes it (a file for
DDP, a directory for DeepSpeed); this module decides where, keeps the policy,
and makes every visible name appear atomically (write to a temp name, rename).
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import random
import re
import shutil
import socket
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from recipes.metrics_json import json_text
from recipes.model_file import load_weights_only, weights_checkpoint
from shards.atomic import STALE_SUFFIX as _STALE
from shards.atomic import atomic_write  # the toolkit's one atomic writer; the rest of dist_train imports it here
from shards.atomic import move_into_place as _move_into_place
from shards.atomic import pid_alive
from shards.atomic import remove as _remove

# The names inside a run directory; nothing else in the toolkit spells them.
CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
MODEL_FILE = "model.pt"          # consolidated fp32 weights written at the end of a run
STAGING = ".staging"             # a checkpoint being written, before it is renamed to latest
RUN_STAMP = "%Y%m%d-%H%M%S"      # run directories are <experiment>_<stamp>[-<n>]
_RUN_SUFFIX = r"_\d{8}-\d{6}(?:-\d+)?"
# ``.staging-<host>-<pid>[.pt]``, or the temp file atomic_write makes of it
_STAGING_NAME = re.compile(r"\.?\.staging-(?P<host>.+)-(?P<pid>\d+)(?:\.pt)?(?:\.(?:tmp|old)\d+)?")


def new_run_dir(output_dir: str | os.PathLike, experiment: str) -> Path:
    """Create and return ``output_dir/<experiment>_<stamp>``; a run started in the
    same second gets ``-1``, ``-2``... (``mkdir`` decides, so two starts never share one)."""
    base = Path(output_dir) / f"{experiment}_{datetime.now().strftime(RUN_STAMP)}"
    base.parent.mkdir(parents=True, exist_ok=True)
    name, k = base, 1
    while True:
        try:
            name.mkdir()
            return name
        except FileExistsError:
            name, k = Path(f"{base}-{k}"), k + 1


def experiment_runs(output_dir: str | os.PathLike, experiment: str) -> list[Path]:
    """The run directories of exactly ``experiment`` under ``output_dir`` (``exp``
    is not ``exp_b``: the name must be followed by the stamp and nothing else)."""
    base = Path(output_dir) / experiment
    return _runs_in(base.parent, re.escape(base.name))


def _runs_in(folder: Path, experiment_pattern: str = ".+") -> list[Path]:
    pattern = re.compile(experiment_pattern + _RUN_SUFFIX)
    try:
        entries = list(folder.iterdir())
    except OSError:  # no such folder (yet), or not one
        return []
    return sorted(p for p in entries if pattern.fullmatch(p.name) and p.is_dir())


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


def run_of(path: Path) -> Path | None:
    """The run a command's model input belongs to: a run directory itself, its
    ``model.pt``, or a checkpoint inside its ``checkpoints/``; None for a file
    outside any run. Outputs of a command about a run go under that run."""
    p = Path(path)
    if is_run_dir(p):
        return p.resolve()
    if p.name == MODEL_FILE and is_run_dir(p.parent):
        return p.parent.resolve()
    return run_dir_of(p)


def atomic_save(obj: Any, path: Path) -> None:
    def write(tmp: Path) -> None:
        # Through a Python file object: a failed write is then an OSError with
        # its errno (ENOSPC...), where torch.save(obj, path_string) only says
        # "basic_ios::clear: iostream error" or "unexpected pos".
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)

    atomic_write(path, write)


def safe_load(path: Path, map_location: Any = "cpu") -> Any:
    # Checkpoints are untrusted input: what is safe to load is the format owner's call.
    return load_weights_only(path, map_location)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` show ``src``'s content, atomically: a hard link (no second
    copy on disk, as timm's CheckpointSaver does), a copy where the filesystem
    has no links. A folder (DeepSpeed) gets its files linked one by one."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    def write(tmp: Path) -> None:
        if src.is_dir():
            shutil.copytree(src, tmp, copy_function=link)
        else:
            link(str(src), str(tmp))

    atomic_write(dst, write)


def weights_only_of_file(latest: Path) -> Any | None:
    """What best / top-k keep of a checkpoint file: ``latest`` without its
    optimizer, scheduler and scaler state (``model_file.weights_checkpoint``):
    with Adam the optimizer state is twice the weights, and only ``latest``
    resumes. None for a folder or a file with nothing to leave out (kept by a
    link). A strategy whose checkpoints are folders hands the manager its own
    (DeepSpeed: ``export.deepspeed_lean_checkpoint``)."""
    return None if latest.is_dir() else weights_checkpoint(load_weights_only(latest, mmap=True))


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


def _is_nan(value: float | None) -> bool:
    return value is not None and math.isnan(value)


def staging_owner() -> str:
    """``<host>-<pid>``: whose save a staging checkpoint is, so that another run
    can tell one of a dead process (swept) from one being written (kept)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _process_gone(host: str, pid: int) -> bool:
    """True only when ``pid`` is known dead: a process of this host that no longer
    exists (another host's process, or one we may not signal, counts as alive)."""
    return host == socket.gethostname() and not pid_alive(pid)


def sweep_dead_stagings(runs_folder: Path) -> None:
    """Remove the staging checkpoints (and their temp files) that killed processes
    of this host left in the run directories under ``runs_folder``. A run killed
    during its first save has no checkpoint to resume, so its own sweep never
    comes; only names this module gives (``.staging-<host>-<pid>``) are touched."""
    for run in _runs_in(Path(runs_folder)):
        try:
            leftovers = list((run / CHECKPOINTS).iterdir())
        except OSError:
            continue
        for leftover in leftovers:
            found = _STAGING_NAME.fullmatch(leftover.name)
            if found and _process_gone(found["host"], int(found["pid"])):
                with contextlib.suppress(OSError):  # a sweep never stops a run from starting
                    _remove(leftover)


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
        """NaN is never better; any number beats none, and beats a NaN an older
        biomtl stored as best (else that NaN would keep best.pt for ever)."""
        if _is_nan(a):
            return False
        return b is None or _is_nan(b) or (a < b if self.mode == "min" else a > b)

    def admit(self, name: str, value: float) -> tuple[bool, list[str]]:
        """Count the save ``name`` with ``value``: (whether it is the new best, the
        top-k names it pushes out). A NaN value enters neither; NaN entries of
        older runs rank last, so they are the first to go."""
        is_best = self.better(value, self.best_value)
        if is_best:
            self.best_value = float(value)
        top = self.top + ([] if _is_nan(value) else [(float(value), name)])
        sign = 1.0 if self.mode == "min" else -1.0
        top.sort(key=lambda t: (math.isnan(t[0]), sign * t[0] if not math.isnan(t[0]) else 0.0))
        self.top, dropped = top[: self.top_k], top[self.top_k:]
        return is_best, [n for _, n in dropped]


class CheckpointManager:
    """Names and keeps checkpoints under ``run_dir/checkpoints``.

    - ``latest``: the most recent save (what ``--resume latest`` loads);
    - ``best``: best value of ``monitor`` so far;
    - ``topk/step_XXXXXXXX``: the ``top_k`` best validated saves;
    - ``periodic/step_XXXXXXXX``: every ``every_steps`` optimizer steps, and every
      save the caller marks ``periodic`` (the trainer: every N-th epoch end), kept.
    ``suffix`` is ``.pt`` for file checkpoints, empty for directory ones.
    """

    def __init__(self, ckpt_dir: Path, policy: CheckpointPolicy, is_main: bool, suffix: str = ".pt",
                 owner: str | None = None, lean: Callable[[Path], Any] | None = None,
                 lean_suffix: str | None = None):
        """``owner``: :func:`staging_owner` of the process whose name the staging
        checkpoint carries; the same on every rank (DeepSpeed ranks write into
        one staging folder), so the trainer hands rank 0's to all. ``lean``:
        what best / top-k keep of ``latest`` (an object saved with ``torch.save``;
        None: ``latest`` linked as it is), default :func:`weights_only_of_file`;
        ``lean_suffix``: their suffix (DeepSpeed: ``.pt``, a file), default ``suffix``."""
        self.dir = ckpt_dir
        self.policy = policy
        self.is_main = is_main
        self.suffix = suffix
        self.lean = lean or weights_only_of_file
        self.kept_suffix = suffix if lean_suffix is None else lean_suffix
        self.staging = self.dir / f"{STAGING}-{owner or staging_owner()}{suffix}"
        self.prepared = False

    def prepare(self) -> None:
        """Make the folders and sweep what killed saves left, here and in the runs
        beside this one. Not in ``__init__``: a resume that then fails to load must
        leave the run as it was; the trainer calls this once it starts training
        (and the first save does, if nobody did)."""
        if self.prepared or not self.is_main:
            return
        self.prepared = True
        (self.dir / "topk").mkdir(parents=True, exist_ok=True)
        if self.policy.every_steps:
            (self.dir / "periodic").mkdir(parents=True, exist_ok=True)
        self.sweep()
        if self.dir.name == CHECKPOINTS:  # inside a run: also what killed runs beside it left
            sweep_dead_stagings(self.dir.parent.parent)

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
        rank 0 then publishes the names. The policy already counts this save's
        metric while ``write`` runs, so :meth:`policy_state` called there is what a
        resume from this very checkpoint must continue with; a failed save leaves
        the policy as it was. ``periodic``: keep this one under ``periodic/``
        whatever ``every_steps`` says."""
        self.prepare()
        latest = self.path(LATEST)
        name = f"step_{step:08d}{self.kept_suffix}"  # top-k; periodic/ keeps full ones
        value = None if metrics is None else metrics.get(self.policy.monitor)
        before = (self.policy.best_value, list(self.policy.top))
        is_best, dropped = self.policy.admit(name, value) if value is not None else (False, [])
        try:
            self._write_staging(write, latest)
            if not self.is_main:
                return
            _move_into_place(self.staging, latest)
            if periodic or (self.policy.every_steps and step % self.policy.every_steps == 0):
                _link_or_copy(latest, self.dir / "periodic" / f"step_{step:08d}{self.suffix}")
            if value is None:
                return
            self._publish_kept(latest, name, is_best)
            for old in dropped:
                _remove(self.dir / "topk" / old)
            text = json_text({"monitor": self.policy.monitor, "mode": self.policy.mode,
                              "best": self.policy.best_value, "top_k": [[v, n] for v, n in self.policy.top]})
            atomic_write(self.dir / "best.json", lambda tmp: tmp.write_text(text))
        except BaseException:
            self.policy.best_value, self.policy.top = before
            raise

    def _publish_kept(self, latest: Path, name: str, is_best: bool) -> None:
        """The top-k file of this save written once without the optimizer state,
        and ``best`` a hard link to it (the same inode: no second copy)."""
        kept, best = self.dir / "topk" / name, self.dir / f"{BEST}{self.kept_suffix}"
        if any(n == name for _, n in self.policy.top):
            self._write_lean(latest, kept)
            if is_best:
                _link_or_copy(kept, best)
        elif is_best:  # top_k = 0
            self._write_lean(latest, best)
        if is_best and best != self.path(BEST):
            _remove(self.path(BEST))  # the full best folder an older biomtl kept in this run

    def _write_lean(self, latest: Path, dst: Path) -> None:
        lean = self.lean(latest)
        if lean is None:
            _link_or_copy(latest, dst)
        else:
            atomic_save(lean, dst)

    def _write_staging(self, write: Callable[[Path], None], latest: Path) -> None:
        if self.is_main:
            _remove(self.staging)
        try:
            write(self.staging)
        except (OSError, RuntimeError) as exc:
            error = as_write_error(exc, latest)  # before the partial file is gone and frees the space again
            if self.is_main:
                with contextlib.suppress(OSError):
                    _remove(self.staging)
            if error is exc:
                raise
            raise error from exc

    def policy_state(self) -> dict[str, Any]:
        return {"best_value": self.policy.best_value, "top": [list(t) for t in self.policy.top]}

    def load_policy_state(self, state: dict[str, Any]) -> None:
        best = state.get("best_value")
        self.policy.best_value = None if best is None or _is_nan(best) else float(best)
        self.policy.top = [(float(v), str(n)) for v, n in state.get("top", [])]
