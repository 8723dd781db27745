"""Consolidated model files: one fp32 state dict with the config and data
info that rebuild its recipe (the layout: :mod:`recipes.model_file`). Made from
- a DeepSpeed checkpoint directory (ZeRO 1/2/3 via DeepSpeed's
  ``zero_to_fp32`` reconstruction of the fp32 master weights; stage 0 has no
  ZeRO partition files: the module weights of ``mp_rank_00_model_states.pt``);
- a DDP ``.pt`` checkpoint (optimizer, scheduler and scaler state dropped);
- a live strategy at the end of training (``run_dir/model.pt``).

Every file read here is untrusted input and loads weights-only, DeepSpeed's
included (see ``dist_train.strategies.deepspeed.checked_tag_dir``); a file
that does not is an :class:`ExportError` naming it and the cause.

``load_exported`` rebuilds the recipe model from such a file alone.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch

from dist_train.checkpoint import LATEST, atomic_save, checkpoint_path, is_run_dir, safe_load
from recipes.model_file import FormatError, StoredModel, dcp_trainer_file, model_file, read_stored

log = logging.getLogger("biomtl")



class ExportError(ValueError):
    """A checkpoint that cannot be exported; the message is one line."""


def _fp32(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone(): tensors reconstructed from flat ZeRO buffers are views; saving
    # a view would write the whole flat buffer into the file.
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous().clone()
            for k, v in state.items()}


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file/directory, or a run directory (then its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"--checkpoint: path does not exist: {path}")
    for candidate in (checkpoint_path(path, LATEST, ".pt"), checkpoint_path(path, LATEST, "")):
        if is_run_dir(path) and candidate.exists():
            return candidate
    return path


class _Payload(NamedTuple):
    model: dict[str, torch.Tensor]
    config: dict[str, Any]
    data_info: dict[str, Any]


def _payload(path: Path, stored: StoredModel, model: Any = None) -> _Payload:
    """The consolidated file's parts; what a checkpoint lacks is one line naming it."""
    model = stored.model if model is None else model
    if not isinstance(model, Mapping) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise ExportError(f"{path}: not a biomtl checkpoint (its model is not a state dict of tensors)")
    if stored.config is None or stored.data_info is None:
        raise ExportError(f"{path}: the checkpoint has no config / data_info (written before checkpoints were "
                          "self-describing, or not by biomtl)")
    return _Payload(_fp32(model), dict(stored.config), dict(stored.data_info))


def _deepspeed_weights(ckpt_dir: Path) -> tuple[Path, StoredModel, Any]:
    from dist_train.strategies.deepspeed import CheckpointLoadError, consolidated_weights

    try:
        return consolidated_weights(ckpt_dir)
    except CheckpointLoadError as exc:
        raise ExportError(str(exc)) from None


def _deepspeed_export(ckpt_dir: Path) -> _Payload:
    model_states, stored, model = _deepspeed_weights(ckpt_dir)
    return _payload(model_states, stored, model)


def _ddp_export(path: Path, payload: bool = True) -> Any:
    """A DDP ``.pt`` (or exported file): its payload; ``payload=False``: what it stores."""
    from dist_train.strategies.deepspeed import load_problem

    if not path.is_file():  # a FIFO would block the read
        raise ExportError(f"{path}: not a regular file")
    try:
        state = safe_load(path)
    except Exception as exc:  # noqa: BLE001 - an untrusted file: one line naming it and the cause
        raise ExportError(f"{path}: {load_problem(path, exc)}") from None
    try:
        stored = read_stored(state)  # a trainer checkpoint, or an already exported file
        return _payload(path, stored) if payload else stored
    except FormatError as exc:
        raise ExportError(f"{path}: {exc}") from None


def _fsdp_export(ckpt_dir: Path) -> _Payload:
    """An FSDP (DCP) folder: the shards of every rank read back into full
    tensors (no process group), the run from its trainer file."""
    from dist_train.strategies.dcp_files import DCPLoadError, full_model_state

    trainer_file = dcp_trainer_file(ckpt_dir)
    stored = _ddp_export(trainer_file, payload=False)
    try:
        model = full_model_state(ckpt_dir)
    except DCPLoadError as exc:
        raise ExportError(str(exc)) from None
    return _payload(trainer_file, stored, model)


def _export_payload(path: Path) -> _Payload:
    from dist_train.strategies.dcp_files import is_dcp_dir

    if not path.is_dir():
        return _ddp_export(path)
    return _fsdp_export(path) if is_dcp_dir(path) else _deepspeed_export(path)


def for_inference(model: dict[str, torch.Tensor], config: dict[str, Any], data_info: dict[str, Any]) -> dict[str, Any]:
    """The payload as inference needs it: the recipe decides what the exported
    model is (:meth:`recipes.base.Recipe.export_for_inference`, e.g. a student
    without its teacher); the config then names that recipe and its params."""
    from dist_train.stored_recipe import StoredRecipeError, recipe_from_stored, stored_params_record

    try:
        recipe = recipe_from_stored(config, data_info).recipe
    except StoredRecipeError as exc:
        raise ExportError(f"the checkpoint's config does not describe a known recipe ({exc})") from None
    name, params, state = recipe.export_for_inference(model)
    stored = (config.get("recipe") or {}).get("params") or {}
    exported = {**config, "recipe": {"name": name, "params": stored_params_record(params, stored)}}
    return model_file(state, exported, data_info)


def export_checkpoint(checkpoint: str | Path, output: str | Path, fmt: str = "pt") -> Path:
    """Write the consolidated file (``fmt`` ``pt``) or a deployment graph (``onnx``,
    ``torchscript``: :mod:`dist_train.deploy`) for a model file, a DeepSpeed directory or a
    DDP ``.pt``; returns ``output``. An existing ``output`` is replaced only when biomtl
    export wrote it."""
    from dist_train.commands import output_clash
    from dist_train.deploy import written_by_biomtl

    path = resolve_checkpoint(checkpoint)
    clash = output_clash("--output", output, [("--checkpoint", path)], folders_whole=True)
    if clash is not None:  # replacing the trainer checkpoint would end the run's resume
        raise ExportError(clash)
    output = Path(output)
    if output.exists() and not (output.is_file() and written_by_biomtl(output, fmt)):
        raise ExportError(f"--output {output}: exists and is not a {fmt} file biomtl export wrote; not replaced")
    payload = for_inference(*_export_payload(path))
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "pt":
            atomic_save(payload, output)
        else:
            _write_deployable(payload, output, fmt)
    except OSError as exc:  # read-only folder, a file in the way, disk full: atomic_write leaves nothing behind
        raise ExportError(f"--output {output}: cannot write it ({exc.strerror or type(exc).__name__})") from None
    return output


def _write_deployable(payload: Mapping[str, Any], output: Path, fmt: str) -> None:
    """The recipe's inference graph of a consolidated payload as ONNX / TorchScript, atomically."""
    from dist_train.checkpoint import atomic_write
    from dist_train.deploy import WRITERS, InferenceGraph, example_inputs
    from dist_train.stored_recipe import recipe_from_stored

    stored = read_stored(payload)
    recipe = recipe_from_stored(stored.config or {}, stored.data_info or {}).recipe
    model = recipe.build_model()
    model.load_state_dict(stored.model)
    example = example_inputs(recipe)
    graph = InferenceGraph(model.float().eval(), example)
    atomic_write(output, lambda tmp: WRITERS[fmt](Path(tmp), graph, example, type(recipe).name))


def export_live(strategy: Any, output: Path, config: dict[str, Any], data_info: dict[str, Any],
                is_main: bool) -> None:
    """End of training: every rank calls this (ZeRO-3 gathers collectively); rank 0 writes."""
    model = strategy.export_state_dict()
    if is_main:
        atomic_save(for_inference(_fp32(model), config, data_info), Path(output))
        log.info("exported the fp32 model to %s", output)


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any, Any]:
    """(recipe model with the weights, Config, DataInfo) from a consolidated file."""
    from dist_train.stored_recipe import recipe_from_stored

    stored = read_stored(safe_load(Path(path)))
    rebuilt = recipe_from_stored(stored.config or {}, stored.data_info or {})
    model = rebuilt.recipe.build_model()
    model.load_state_dict(stored.model)
    return model.to(device).eval(), rebuilt.cfg, rebuilt.recipe.data_info


__all__ = ["ExportError", "export_checkpoint", "export_live", "load_exported", "resolve_checkpoint"]
