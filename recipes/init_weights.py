"""``recipe.params.init_from``: start a recipe model from a previous run's weights.

The file is a previous run's exported model (``RUN/model.pt``) or one of its
trainer checkpoints (``RUN/checkpoints/best.pt``), read weights-only through
their format's owner, :mod:`recipes.model_file`. (A run directory is not
accepted: which file a run directory holds is dist_train's knowledge, and
recipes do not import dist_train.)

What must fit, and what may not: every parameter or buffer *outside* the
recipe's head prefixes (the backbone, the neck, DCAL's GLCA block) must be in
the file with the same shape, and the file must hold nothing else outside
them, else :class:`InitFromError` names the first offending tensor (one
line). Head tensors (identity classifiers, whose size is the number of
training identities; learned loss weights) are loaded when their shape fits
and otherwise keep their fresh initialisation, with an info line: that is
the pretrain-on-many-identities, fine-tune-on-few case. *Derived* tensors
(DCAL's GLCA block, a copy of the last transformer block at initialisation)
must fit when present; when the file lacks them (a plain-ViT run) they are
listed in ``InitReport.derived_missing`` for the recipe to derive again from
the loaded weights, and a file's derived tensors that the model lacks are
ignored (a plain ViT started from a DCAL run).

The check runs twice in a fresh run: in the preflight (a config error, exit 2,
before any run directory exists: the recipe's ``check_start_files`` calls
:func:`check_init_from`, which builds the model on the meta device) and when
the real model is built (:func:`load_init_weights`). A resumed run, or a model
rebuilt from a checkpoint, has ``init_from`` off (a start-only param): its
weights come from the checkpoint, and the file may be gone.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from recipes.model_file import FormatError, load_weights_only, read_stored

log = logging.getLogger("biomtl.init_from")

__all__ = ["InitFromError", "InitReport", "read_init_state", "plan_init", "check_init_from", "load_init_weights"]


class InitFromError(ValueError):
    """``init_from`` names a file that does not fit the model (one-line message)."""


@dataclass
class InitReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    skipped_heads: list[str] = field(default_factory=list)   # head tensors of another shape, or not in the file
    derived_missing: list[str] = field(default_factory=list)  # derived tensors the file lacks


def read_init_state(path: str | os.PathLike, recipe: str | None = None) -> dict[str, torch.Tensor]:
    """The model state dict of an exported model or trainer checkpoint file.

    ``recipe``: when the file says which recipe wrote it, it must be this one."""
    p = Path(path)
    if not p.is_file():
        what = "a folder; pass its model file (RUN/model.pt or a checkpoint .pt)" if p.is_dir() else "not found"
        raise InitFromError(f"init_from {p}: {what}")
    try:
        state = load_weights_only(p)
    except Exception as exc:  # noqa: BLE001 - an untrusted file: one line naming it and the cause
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise InitFromError(f"init_from {p}: not a weights-only torch file ({first[:200]})") from None
    try:
        stored = read_stored(state)
    except FormatError:
        stored = None
    if stored is None or not stored.model:
        raise InitFromError(f"init_from {p}: no model state dict (expected a biomtl model.pt or trainer checkpoint)")
    written_by = (stored.config or {}).get("recipe")
    written_by = written_by.get("name") if isinstance(written_by, Mapping) else None
    if recipe is not None and written_by is not None and written_by != recipe:
        raise InitFromError(f"init_from {p}: a {written_by} model; this recipe is {recipe}")
    return dict(stored.model)


def _is_head(name: str, head_prefixes: Sequence[str]) -> bool:
    return any(name.startswith(prefix) for prefix in head_prefixes)


def plan_init(path: str, file_shapes: Mapping[str, tuple[int, ...]], model_shapes: Mapping[str, tuple[int, ...]],
              head_prefixes: Sequence[str], derived_prefixes: Sequence[str] = ()) -> InitReport:
    """Which tensors load, which head tensors keep their initialisation and which
    derived tensors the file lacks; :class:`InitFromError` on the first other
    tensor that does not fit."""
    report = InitReport(path)
    for name, shape in model_shapes.items():
        head = _is_head(name, head_prefixes)
        if name not in file_shapes:
            if head:
                report.skipped_heads.append(name)
                continue
            if _is_head(name, derived_prefixes):
                report.derived_missing.append(name)
                continue
            raise InitFromError(f"init_from {path}: {name} {list(shape)} is not in the file (another architecture? "
                                f"init_from needs the same backbone settings)")
        if tuple(file_shapes[name]) != tuple(shape):
            if head:
                report.skipped_heads.append(name)
                continue
            raise InitFromError(f"init_from {path}: {name} is {list(file_shapes[name])} in the file but "
                                f"{list(shape)} in this model (init_from needs the same backbone settings)")
        report.loaded.append(name)
    extra = [name for name in file_shapes if name not in model_shapes
             and not _is_head(name, tuple(head_prefixes) + tuple(derived_prefixes))]
    if extra:
        raise InitFromError(f"init_from {path}: {extra[0]} (and {len(extra) - 1} more) in the file has no place "
                            f"in this model (another architecture?)")
    return report


def check_init_from(path: str, build_model: Callable[[], nn.Module], head_prefixes: Sequence[str],
                    recipe: str | None = None, derived_prefixes: Sequence[str] = ()) -> InitReport:
    """Validate ``init_from`` without loading weights into anything: the model
    ``build_model()`` makes on the meta device against the file's shapes."""
    file_shapes = {k: tuple(v.shape) for k, v in read_init_state(path, recipe).items()}
    with torch.device("meta"):
        model = build_model()
    return plan_init(str(path), file_shapes, {k: tuple(v.shape) for k, v in model.state_dict().items()},
                     head_prefixes, derived_prefixes)


def load_init_weights(model: nn.Module, path: str, head_prefixes: Sequence[str],
                      recipe: str | None = None, derived_prefixes: Sequence[str] = ()) -> InitReport:
    """Load ``path`` into ``model`` (see the module doc); a model on the meta
    device (shape checks) is only checked."""
    state = read_init_state(path, recipe)
    own = model.state_dict()
    report = plan_init(str(path), {k: tuple(v.shape) for k, v in state.items()},
                       {k: tuple(v.shape) for k, v in own.items()}, head_prefixes, derived_prefixes)
    if any(t.is_meta for t in own.values()):
        return report
    model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    log.info("init_from %s: loaded %d tensors", path, len(report.loaded))
    if report.skipped_heads:
        log.info("init_from %s: %d head tensors of another shape or not in the file keep their fresh "
                 "initialisation: %s", path, len(report.skipped_heads), ", ".join(report.skipped_heads))
    return report
