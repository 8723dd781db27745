"""The model-file and checkpoint formats: the one module that knows their layout.

- the model file (``RUN/model.pt``, ``biomtl export``): ``{"model": {name: fp32
  tensor}, "config": resolved config, "data_info": plain dict, "format_version"}``
  plus an optional ``"threshold"``;
- a DDP trainer checkpoint (``checkpoints/latest.pt`` ...): ``{"model",
  "optimizer", "scheduler", "scaler", "skipped_steps", "client": {"config",
  "data_info", ...the trainer's loop state}, "format_version"}``;
- a DeepSpeed checkpoint folder: DeepSpeed's own layout; our client state is
  the ``"biomtl_client"`` entry of its model-states file, beside ``"format_version"``;
- an FSDP checkpoint folder: a ``torch.distributed.checkpoint`` (DCP) directory
  of ``{"model": sharded model state, "optim": sharded optimizer state}``
  (flattened by DCP to dotted keys) plus ``trainer.pt``, a DDP trainer
  checkpoint with an empty model and optimizer (scheduler, scaler, client).

``format_version`` is written on every save; a file without it is an older
biomtl's (version 0, read the same way); a newer version is refused in one
line. Everything is read with ``torch.load(weights_only=True)``: a file is
untrusted input and stays data.

It lives at the recipe layer because both sides read these files: the recipes
(``init_from`` starts a model from a previous run's file) and ``dist_train``
(the strategies, export, inference, the resume checks); it knows only dicts
and ``torch.load``, nothing of configs or strategies.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

FORMAT_VERSION = 1

_MODEL = "model"
_CONFIG = "config"
_DATA_INFO = "data_info"
_CLIENT = "client"
_THRESHOLD = "threshold"
_VERSION = "format_version"
_TRAINER_PARTS = ("optimizer", "scheduler", "scaler")
_SKIPPED = "skipped_steps"
_DEEPSPEED_CLIENT = "biomtl_client"  # not DeepSpeed's own keys ("module", "optimizer", ...)
_DCP_OPTIM = "optim"
_DCP_TRAINER_FILE = "trainer.pt"
# DeepSpeed's model-states file of a tag folder: stages 0-2, then ZeRO-3
_DEEPSPEED_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")

__all__ = ["FORMAT_VERSION", "FormatError", "StoredModel", "TrainerState", "dcp_model_prefix", "dcp_parts",
           "dcp_state", "dcp_trainer_file", "deepspeed_client",
           "deepspeed_client_state", "deepspeed_states_file", "load_weights_only", "model_file",
           "is_lean_checkpoint", "lean_checkpoint", "read_deepspeed_states", "read_stored", "read_trainer_state", "run_description",
           "trainer_checkpoint", "weights_checkpoint"]


class FormatError(ValueError):
    """A file that is not in the format it should be (one-line message, without the path)."""


def load_weights_only(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` of an untrusted file: tensors and plain data only
    (``mmap``: memory-map a zip archive, so a check reads little more than its pickle)."""
    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and zipfile.is_zipfile(path))


def _check_version(obj: Mapping[str, Any]) -> None:
    version = obj.get(_VERSION, 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise FormatError(f"malformed format_version {version!r}")
    if version > FORMAT_VERSION:
        raise FormatError(f"written by a newer biomtl (format_version {version}; this one reads up to "
                          f"{FORMAT_VERSION})")


# ---------------------------------------------------------------------------
# Writing


def run_description(config: Mapping[str, Any], data_info: Mapping[str, Any]) -> dict[str, Any]:
    """What makes a checkpoint self-describing (inside the trainer's client state)."""
    return {_CONFIG: config, _DATA_INFO: data_info}


def model_file(model: Mapping[str, torch.Tensor], config: Mapping[str, Any], data_info: Mapping[str, Any],
               threshold: float | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {_MODEL: dict(model), _CONFIG: dict(config), _DATA_INFO: dict(data_info),
                           _VERSION: FORMAT_VERSION}
    if threshold is not None:
        obj[_THRESHOLD] = float(threshold)
    return obj


def trainer_checkpoint(model: Mapping[str, torch.Tensor], optimizer: Any, scheduler: Any, scaler: Any,
                       skipped_steps: int, client: Mapping[str, Any]) -> dict[str, Any]:
    return {_MODEL: model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler,
            _SKIPPED: skipped_steps, _CLIENT: client, _VERSION: FORMAT_VERSION}


def weights_checkpoint(obj: Any) -> Any | None:
    """A DDP trainer checkpoint without what only resuming needs (optimizer,
    scheduler and scaler state): what ``best`` and ``topk/`` keep. Weights,
    config, data info and loop state stay, so eval, export, inference and
    ``init_from`` read it as they read ``latest``; ``None`` when ``obj`` holds
    none of those parts (nothing to leave out: keep the file as it is)."""
    if not isinstance(obj, Mapping) or not any(k in obj for k in (*_TRAINER_PARTS, _SKIPPED)):
        return None
    return {k: v for k, v in obj.items() if k not in (*_TRAINER_PARTS, _SKIPPED)}


def lean_checkpoint(model: Mapping[str, torch.Tensor], client: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`weights_checkpoint` leaves of a trainer checkpoint, made from its
    parts: the (consolidated) weights and the client state. A DeepSpeed run's best /
    top-k files have this layout, so they read as a DDP run's do."""
    return {_MODEL: dict(model), _CLIENT: dict(client), _VERSION: FORMAT_VERSION}


def is_lean_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` is a best / top-k checkpoint (:func:`lean_checkpoint`): a
    client state and weights, none of the parts only resuming needs."""
    return (isinstance(obj, Mapping) and isinstance(obj.get(_MODEL), Mapping) and isinstance(obj.get(_CLIENT), Mapping)
            and not any(k in obj for k in (*_TRAINER_PARTS, _SKIPPED)))


def deepspeed_client_state(client: Mapping[str, Any]) -> dict[str, Any]:
    """What the DeepSpeed strategy hands ``engine.save_checkpoint`` as its client state."""
    return {_DEEPSPEED_CLIENT: client, _VERSION: FORMAT_VERSION}


# ---------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class StoredModel:
    """A model file or a trainer checkpoint, as inference, export and ``init_from`` see it."""

    model: Mapping[str, torch.Tensor]
    config: Mapping[str, Any] | None
    data_info: Mapping[str, Any] | None
    client: Mapping[str, Any] | None   # a trainer checkpoint's client state; None for a model file
    threshold: float | None
    step: int | None

    @property
    def kind(self) -> str:
        return "trainer checkpoint" if self.client is not None else "exported model"


def read_stored(obj: Any) -> StoredModel:
    """The model state dict with its config and data info, from a loaded model
    file or DDP trainer checkpoint. The config / data info may be absent (a
    file written before checkpoints were self-describing): the caller decides."""
    if not isinstance(obj, Mapping) or _MODEL not in obj:
        raise FormatError("not a biomtl checkpoint (no 'model')")
    _check_version(obj)
    model = obj[_MODEL]
    if not isinstance(model, Mapping) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise FormatError("not a biomtl checkpoint (its model is not a state dict of tensors)")
    client = obj.get(_CLIENT) if isinstance(obj.get(_CLIENT), Mapping) else None
    return _stored(model, obj, client)


def _stored(model: Mapping[str, torch.Tensor], top: Mapping[str, Any], client: Mapping[str, Any] | None,
            step: int | None = None) -> StoredModel:
    where = client if client is not None else top
    config, data_info = where.get(_CONFIG), where.get(_DATA_INFO)
    threshold = top.get(_THRESHOLD, (client or {}).get(_THRESHOLD))
    if client is not None and step is None:
        loop = client.get("loop")
        step = loop.get("step") if isinstance(loop, Mapping) else None
    elif client is None:
        step = top.get("step")
    return StoredModel(model, config if isinstance(config, Mapping) else None,
                       data_info if isinstance(data_info, Mapping) else None, client,
                       None if threshold is None else float(threshold), step)


@dataclass(frozen=True)
class TrainerState:
    """What a DDP trainer checkpoint holds besides the weights."""

    model: Mapping[str, torch.Tensor]
    optimizer: Any
    scheduler: Any
    scaler: Any
    skipped_steps: int
    client: Mapping[str, Any]


def read_trainer_state(obj: Any) -> TrainerState:
    """A DDP trainer checkpoint's parts; :class:`FormatError` for anything else
    (an exported model file is named as such: it cannot be resumed)."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get(_MODEL), Mapping):
        raise FormatError("not a biomtl training checkpoint (no model state)")
    _check_version(obj)
    if "optimizer" not in obj or not isinstance(obj.get(_CLIENT), Mapping):
        if _CONFIG in obj:
            raise FormatError("an exported model file (weights only, no optimizer or loop state); "
                              "resume from RUN/checkpoints/latest.pt")
        if isinstance(obj.get(_CLIENT), Mapping):
            raise FormatError("a best / top-k checkpoint (weights and loop state, no optimizer state: only "
                              "checkpoints/latest.pt continues a run exactly); resume from RUN/checkpoints/latest.pt, "
                              "or start a new run from its weights with recipe.params.init_from where the recipe has it")
        raise FormatError("not a biomtl training checkpoint (no optimizer or loop state)")
    return TrainerState(obj[_MODEL], obj["optimizer"], obj.get("scheduler"), obj.get("scaler"),
                        int(obj.get(_SKIPPED, 0)), obj[_CLIENT])


def deepspeed_states_file(tag_dir: Path) -> Path:
    """DeepSpeed's model-states file of a tag folder (it holds the module state
    and our client state)."""
    for name in _DEEPSPEED_STATES:
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise FormatError(f"{tag_dir}: no DeepSpeed model states file (incomplete checkpoint?)")


def deepspeed_client(states: Any) -> Mapping[str, Any]:
    """Our client state from DeepSpeed's model-states dict (or from the client
    states ``engine.load_checkpoint`` returns)."""
    if not isinstance(states, Mapping) or not isinstance(states.get(_DEEPSPEED_CLIENT), Mapping):
        raise FormatError("no biomtl client state in the DeepSpeed checkpoint (not written by biomtl?)")
    _check_version(states)
    return states[_DEEPSPEED_CLIENT]


def dcp_state(model: Mapping[str, Any], optimizer: Mapping[str, Any]) -> dict[str, Any]:
    """What an FSDP checkpoint hands ``torch.distributed.checkpoint`` (sharded state dicts)."""
    return {_MODEL: model, _DCP_OPTIM: optimizer}


def dcp_parts(state: Mapping[str, Any]) -> tuple[Any, Any]:
    """(model, optimizer) state dicts of :func:`dcp_state`'s dict, after a DCP load into it."""
    return state[_MODEL], state[_DCP_OPTIM]


def dcp_model_prefix() -> str:
    """The dotted-key prefix of the model's tensors in a DCP index."""
    return _MODEL + "."


def dcp_trainer_file(ckpt_dir: Path) -> Path:
    """The trainer state file of an FSDP (DCP) checkpoint folder (read with
    :func:`read_trainer_state`; its model and optimizer are empty)."""
    return Path(ckpt_dir) / _DCP_TRAINER_FILE


def read_deepspeed_states(states: Any) -> tuple[StoredModel, int]:
    """(the stored model, the ZeRO stage) of DeepSpeed's model-states dict; the
    model is the module's own weights (full ones at stage 0 only)."""
    client = deepspeed_client(states)
    ds_config = states.get("ds_config")
    zero = ds_config.get("zero_optimization", {}) if isinstance(ds_config, Mapping) else {}
    stage = zero.get("stage", 0) if isinstance(zero, Mapping) else 0
    module = states.get("module")
    return _stored(module if isinstance(module, Mapping) else {}, states, client), int(stage or 0)
