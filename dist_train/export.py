"""Consolidated model files: one fp32 state dict, loadable with ``weights_only=True``.

    {"model": {name: fp32 tensor}, "config": resolved config dict, "data_info": plain dict}

Made from
- a DeepSpeed checkpoint directory (ZeRO 1/2/3 via DeepSpeed's
  ``zero_to_fp32`` reconstruction of the fp32 master weights; stage 0 has no
  ZeRO partition files: the module weights of ``mp_rank_00_model_states.pt``);
- a DDP ``.pt`` checkpoint (optimizer, scheduler and scaler state dropped);
- a live strategy at the end of training (``run_dir/model.pt``).

``load_exported`` rebuilds the recipe model from such a file alone.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from dist_train.checkpoint import LATEST, atomic_save, checkpoint_path, is_run_dir, safe_load

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


def model_states_file(tag_dir: Path) -> Path:
    """DeepSpeed's model-states file of a tag directory (it holds the module
    state and our client state): ``mp_rank_00_model_states.pt`` for stages
    0-2, ``zero_pp_rank_0_mp_rank_00_model_states.pt`` for ZeRO-3."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise ExportError(f"{tag_dir}: no DeepSpeed model states file (incomplete checkpoint?)")


def _deepspeed_export(ckpt_dir: Path) -> dict[str, Any]:
    from dist_train.strategies.deepspeed import CLIENT_KEY, import_deepspeed

    tag_file = ckpt_dir / "latest"
    if not tag_file.is_file():
        raise ExportError(f"{ckpt_dir}: not a DeepSpeed checkpoint directory (no 'latest' tag file)")
    tag = tag_file.read_text().strip()
    model_states = model_states_file(ckpt_dir / tag)
    import_deepspeed()  # DS_ACCELERATOR on a machine without GPUs, before DeepSpeed's first use
    # DeepSpeed's directory format pickles non-tensor objects, so it needs
    # weights_only=False: acceptable only for checkpoints this toolkit wrote
    # (trusted). The file written here is the safe, weights_only one.
    states = torch.load(model_states, map_location="cpu", weights_only=False)
    client = states.get(CLIENT_KEY)
    if client is None:
        raise ExportError(f"{model_states}: no toolkit client state (not written by biomtl?)")
    zero_files = sorted((ckpt_dir / tag).glob("*zero_pp_rank_*_optim_states.pt"))
    stage = int((states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
    if stage > 0 or zero_files:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 prints its progress (stdout) and a tqdm bar (stderr): keep them for --debug logs only.
        chatter = io.StringIO()
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            model = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        log.debug("zero_to_fp32: %s", chatter.getvalue())
    else:
        # Stage 0: no ZeRO partitions; the module's own (full) weights. In
        # fp32 these are the trained weights; with bf16/fp16 DeepSpeed keeps
        # its fp32 master copy in the optimizer, and this is its 16-bit image.
        model = states["module"]
    return {"model": _fp32(model), "config": client["config"], "data_info": client["data_info"]}


def _ddp_export(path: Path) -> dict[str, Any]:
    state = safe_load(path)
    if not isinstance(state, dict) or "model" not in state:
        raise ExportError(f"{path}: not a biomtl checkpoint (no 'model')")
    client = state.get("client") or {}
    if "config" not in client:
        if "config" in state:  # already an exported file
            return {"model": _fp32(state["model"]), "config": state["config"], "data_info": state["data_info"]}
        raise ExportError(f"{path}: the checkpoint has no config (written before checkpoints were self-describing)")
    return {"model": _fp32(state["model"]), "config": client["config"], "data_info": client["data_info"]}


def export_checkpoint(checkpoint: str | Path, output: str | Path) -> Path:
    """Write the consolidated file for a DeepSpeed directory or a DDP ``.pt``; returns ``output``."""
    path = resolve_checkpoint(checkpoint)
    payload = _deepspeed_export(path) if path.is_dir() else _ddp_export(path)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(payload, output)
    return output


def export_live(strategy: Any, output: Path, config: dict[str, Any], data_info: dict[str, Any],
                is_main: bool) -> None:
    """End of training: every rank calls this (ZeRO-3 gathers collectively); rank 0 writes."""
    model = strategy.export_state_dict()
    if is_main:
        atomic_save({"model": _fp32(model), "config": config, "data_info": data_info}, Path(output))
        log.info("exported the fp32 model to %s", output)


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any, Any]:
    """(recipe model with the weights, Config, DataInfo) from a consolidated file."""
    from dist_train.config import config_from_dict, recipe_params
    from recipes.base import DataInfo, get_recipe

    state = safe_load(Path(path))
    cfg = config_from_dict(state["config"])
    info = DataInfo.from_dict(state["data_info"])
    recipe = get_recipe(cfg.recipe.name)(recipe_params(cfg), info)
    model = recipe.build_model()
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, info


__all__ = ["ExportError", "export_checkpoint", "export_live", "load_exported", "model_states_file",
           "resolve_checkpoint"]
