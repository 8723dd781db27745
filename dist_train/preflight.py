"""Everything checked before a run starts: the config file and overrides
(:func:`dist_train.config.load_config`), the options only the chosen strategy
and tracker understand (the DeepSpeed JSON is built here, :func:`deepspeed_json`;
the trackers are checked by their own module), the weights files the
recipe parameters name, where the run will write, which splits the data has, and a ``--resume`` checkpoint. A mistake is
one ``ConfigError`` line before any process group, directory or file exists."""
from __future__ import annotations

import errno
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from dist_train.config import (CACHE_ENV, NO_SPLIT, Config, ConfigError, DataConfig, config_from_dict, load_config,
                               resolved_config_dict, synthetic_cache_dir, synthetic_spec, validates)
from recipes.model_file import (FormatError, dcp_trainer_file, deepspeed_states_file, is_lean_checkpoint,
                                load_weights_only, read_deepspeed_states, read_stored, read_trainer_state)


def load_checked_config(path: str | Path | None, overrides: Sequence[str] = (), start: bool = True) -> Config:
    """``start=False``: the run resumes; the files read only to start one
    (start-only recipe params) are neither required nor read."""
    cfg = load_config(path, list(overrides), start)
    if cfg.train.strategy == "deepspeed":  # JSON vs toolkit batch/precision settings; fp16 on this device
        check_deepspeed_config(cfg)
    if cfg.logging.tracking == "mlflow":  # an optional extra
        from dist_train.tracking import require_mlflow

        require_mlflow()
    if cfg.logging.tracking == "wandb":  # an optional extra
        from dist_train.tracking import require_wandb

        require_wandb()
    check_sharded_head(cfg)
    check_weight_files(cfg, start)
    check_frozen_models(cfg)
    if start:
        check_start_files(cfg)
    if cfg.data.val_bins:
        from dist_train.val_bins import check_val_bins

        check_val_bins(cfg.data.val_bins)
    check_monitored_metrics(cfg)
    check_writable_folder("experiment.output_dir", cfg.experiment.output_dir)
    if cfg.data.source == "synthetic" and not _synthetic_cache(cfg).is_dir():
        key = ("data.synthetic.cache_dir" if cfg.data.synthetic.cache_dir else
               f"${CACHE_ENV}" if os.environ.get(CACHE_ENV) else "experiment.output_dir (its cache/)")
        check_writable_folder(key, synthetic_cache_dir(cfg))
    check_splits(cfg)
    return cfg


# ---------------------------------------------------------------------------
# Weights files named by recipe.params

WEIGHT_FIELDS = ("weights_path", "weights")  # name endings: weights_path, lpips_weights, teacher_weights


def check_weight_files(cfg: Config, start: bool = True) -> None:
    """Every weights file a recipe parameter names (a path field ending in
    :data:`WEIGHT_FIELDS`) loads weights-only and holds tensors, read by their
    owner :func:`models.backbones.read_state_dict`: a text file, pickled code
    or a file of no tensors is one line here, not a traceback once the run
    directory exists. Without ``start`` (a resume) the start-only ones are not
    read. (``init_from`` is checked by :func:`check_start_files`.)"""
    import dataclasses

    from dist_train.config import recipe_params
    from models.backbones import WeightsError, read_state_dict
    from recipes.base import START_ONLY

    params = recipe_params(cfg)
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if not (f.metadata.get("path") and value and f.name.endswith(WEIGHT_FIELDS)):
            continue
        if not start and f.metadata.get(START_ONLY):
            continue
        try:
            read_state_dict(value)
        except WeightsError as exc:
            raise ConfigError(f"recipe.params.{f.name}: {(str(exc).splitlines() or [''])[0][:300]}") from None


def check_frozen_models(cfg: Config) -> None:
    """The model files a recipe loads frozen while training (``Recipe.frozen_model_files``: a
    distillation teacher), fresh runs and resumes alike: each is rebuilt once on the CPU by
    :func:`dist_train.inference.load_frozen_model` (weights-only), so a missing, garbled or
    foreign file is one line naming the param, exit 2, before any run directory exists."""
    from dist_train.config import recipe_params
    from dist_train.inference import CheckpointError, load_frozen_model
    from recipes.base import get_recipe

    try:
        files = get_recipe(cfg.recipe.name).frozen_model_files(recipe_params(cfg))
    except ValueError as exc:
        raise ConfigError(f"recipe.params: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    for name, path in files.items():
        try:
            load_frozen_model(path, "cpu")
        except CheckpointError as exc:
            raise ConfigError(f"recipe.params.{name}: {(str(exc).splitlines() or [''])[0][:300]}") from None


def check_start_files(cfg: Config) -> None:
    """What the recipe reads to start a fresh run fits (e.g. an ``init_from``
    file against the model on the meta device): the recipe's own check, run
    once, before any run directory exists."""
    from dist_train.config import recipe_params

    check_recipe_start(cfg.recipe.name, recipe_params(cfg))


def check_recipe_start(recipe: str, params: Any) -> None:
    """:func:`check_start_files` for a recipe name and its typed params."""
    from recipes.base import get_recipe

    try:
        get_recipe(recipe).check_start_files(params)
    except ValueError as exc:  # InitFromError... (ConfigError too)
        raise ConfigError(f"recipe.params: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None


# ---------------------------------------------------------------------------
# Metrics the run watches


def check_monitored_metrics(cfg: Config) -> None:
    """``checkpoint.monitor`` and ``train.early_stopping.metrics`` name metrics the
    recipe's validation produces (it declares them); a misspelt one would train
    without ever writing best.pt. Without validation nothing is watched."""
    import difflib

    from dist_train.config import recipe_params
    from recipes.base import get_recipe
    from recipes.bin_verification import training_metric_names
    from shards.verification_bins import bin_name

    if not validates(cfg):
        return
    recipe = get_recipe(cfg.recipe.name)
    try:
        names = {"loss", *recipe.validation_metric_names(recipe_params(cfg))}
        names |= training_metric_names([bin_name(p) for p in cfg.data.val_bins])  # data.val_bins: <name>_acc...
    except NotImplementedError as exc:
        raise ConfigError(f"recipe.name: {exc}") from None
    watched = [("checkpoint.monitor", cfg.checkpoint.monitor)]
    watched += [("train.early_stopping.metrics", m) for m in cfg.train.early_stopping.metrics]
    for key, name in watched:
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"{key}: '{name}' is not a validation metric of recipe {cfg.recipe.name} "
                              f"({hint}it has: {', '.join(sorted(names))})")


# ---------------------------------------------------------------------------
# Where the run writes


def check_writable_folder(key: str, folder: str | os.PathLike) -> None:
    """``folder`` exists as a writable folder or can be made: its nearest
    existing ancestor is a folder we may write in. Catches a file in the way
    and a read-only place before a rank tries ``mkdir`` and fails in a traceback."""
    target = Path(folder).absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "" if existing == target else f" (cannot create {target})"
        raise ConfigError(f"{key}: {existing} is a file, not a folder{what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "" if existing == target else f" (cannot create {target} in it)"
        raise ConfigError(f"{key}: {existing} is not writable: permission denied or a read-only file system{what}")


# ---------------------------------------------------------------------------
# Splits


def _available_splits(cfg: Config) -> tuple[str, dict[str, int]]:
    """(where the data is, {split: samples}) without writing anything: the
    shard manifest, or the fixed splits of the built-in synthetic data."""
    if cfg.data.source == "shards":
        from shards.manifest import Manifest

        try:
            manifest = Manifest.load(cfg.data.shards)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"data.shards: {cfg.data.shards}: unreadable manifest "
                              f"({(str(exc).splitlines() or [type(exc).__name__])[0]})") from None
        return cfg.data.shards, {name: manifest.split_size(name) for name in manifest.splits}
    from shards.synthetic import SyntheticSpec

    return "the synthetic data", {name: 1 for name, ratio in SyntheticSpec().splits if ratio > 0}


def check_splits(cfg: Config) -> None:
    """The train split, and the validation split unless ``data.val_split=none``,
    exist and hold samples; a test split named other than the default exists.
    A missing one fails here instead of after training."""
    where, sizes = _available_splits(cfg)
    have = ", ".join(f"{name} ({n})" for name, n in sizes.items()) if cfg.data.source == "shards" \
        else ", ".join(sizes)
    d = cfg.data
    if not sizes.get(d.train_split):
        state = "is empty" if d.train_split in sizes else "does not exist"
        largest = max(sizes, key=lambda n: sizes[n], default=None)
        raise ConfigError(f"data.train_split: split '{d.train_split}' {state} in {where} (splits: {have or 'none'}); "
                          f"set data.train_split={largest if largest and sizes[largest] else 'NAME'}")
    if validates(cfg) and not sizes.get(d.val_split):
        state = "is empty" if d.val_split in sizes else "does not exist"
        others = [n for n in sizes if n != d.train_split and sizes[n]]
        hint = f"data.val_split={others[0]}" if others else "data.val_split=NAME"
        raise ConfigError(f"data.val_split: validation split '{d.val_split}' {state} in {where} (splits: {have}); "
                          f"set {hint}, or train without validation: data.val_split={NO_SPLIT}")
    # The test split is optional (data without one is tested on nothing), but
    # one named other than the default must exist: a typo would go unnoticed.
    if d.test_split not in sizes and d.test_split not in (DataConfig().test_split, NO_SPLIT):
        raise ConfigError(f"data.test_split: split '{d.test_split}' does not exist in {where} (splits: {have}); "
                          f"set data.test_split to one of them, or data.test_split={NO_SPLIT}")


# ---------------------------------------------------------------------------
# --resume


def check_resume(cfg: Config, path: Path, data_info: Any = None) -> None:
    """A ``--resume`` checkpoint loads weights-only and fits this run: same
    strategy layout (DDP file / DeepSpeed folder), recipe and optimizer, and
    every parameter name and shape of the model this config builds. Nothing
    is created or written; a mismatch is one ``ConfigError`` line.
    ``data_info``: the data the run trains on, once they exist; without it the
    shapes are compared only where the data can be known without making them
    (so the trainer checks again after making synthetic data, before it writes)."""
    where = f"--resume {path}"
    if cfg.train.strategy == "deepspeed":
        if not path.is_dir():
            _refuse_lean(where, path)
            raise ConfigError(f"{where}: a DeepSpeed checkpoint is a folder (checkpoints/latest); this is a file "
                              f"(a DDP checkpoint? then train.strategy=ddp)")
        stored, shapes = _deepspeed_checkpoint(path)
    elif cfg.train.strategy == "fsdp":
        stored, shapes = _fsdp_checkpoint(path)
    else:
        if path.is_dir():
            raise ConfigError(f"{where}: a folder (a DeepSpeed checkpoint? then train.strategy=deepspeed; an FSDP "
                              f"one: train.strategy=fsdp); train.strategy=ddp resumes from a .pt file")
        stored, shapes = _ddp_checkpoint(path)
    old = stored.config
    old_recipe = (old.get("recipe") or {}).get("name")
    if old_recipe != cfg.recipe.name:
        raise ConfigError(f"{where}: a checkpoint of recipe '{old_recipe}', but recipe.name is "
                          f"'{cfg.recipe.name}'; resume with the run's own config (its config.yaml)")
    old_optimizer = (old.get("train") or {}).get("optimizer")
    if old_optimizer not in (None, cfg.train.optimizer):
        raise ConfigError(f"{where}: the checkpoint's optimizer state is {old_optimizer}, but train.optimizer is "
                          f"{cfg.train.optimizer}; set train.optimizer={old_optimizer}")
    if shapes is None:  # DeepSpeed: the model the checkpoint's own config describes
        shapes = _model_shapes(_config_or_error(where, old), _data_info_or_error(where, stored.data_info))
    expected = _model_shapes(cfg, data_info if data_info is not None else _current_data_info(cfg, stored))
    if expected is not None:
        _compare_shapes(where, shapes, expected, cfg.recipe.name)


def _ddp_checkpoint(path: Path, where: str | None = None) -> tuple[Any, dict[str, tuple[int, ...]]]:
    from dist_train.strategies.deepspeed import load_problem

    where = where or f"--resume {path}"
    if not path.is_file():  # a FIFO would block the read
        raise ConfigError(f"{where}: not a regular file")
    try:  # untrusted: weights only; memory-mapped, so every rank reading it costs little
        state = load_weights_only(path, mmap=True)
    except Exception as exc:  # noqa: BLE001 - an untrusted file: one line naming it and the cause
        problem = load_problem(path, exc)
        if isinstance(exc, OSError) and exc.errno == errno.EINVAL and not zipfile.is_zipfile(path):
            # torch.load reads a cut-off archive as a legacy file and fails with EINVAL
            problem = "truncated or corrupt (not a complete PyTorch zip archive)"
        raise ConfigError(f"{where}: {problem}") from None
    try:
        trainer = read_trainer_state(state)
        stored = read_stored(state)
    except FormatError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    _check_client(where, stored)
    return stored, {k: tuple(v.shape) for k, v in trainer.model.items() if hasattr(v, "shape")}


def _refuse_lean(where: str, path: Path) -> None:
    """A DeepSpeed or FSDP run's best / top-k file (weights and loop state, one
    file) cannot resume: one line naming the folder that does."""
    try:
        lean = path.is_file() and is_lean_checkpoint(load_weights_only(path, mmap=True))
    except Exception:  # noqa: BLE001 - not a lean file: the caller's own message
        return
    if lean:
        raise ConfigError(f"{where}: a best / top-k checkpoint (weights and loop state, no optimizer state: only "
                          "checkpoints/latest continues a run exactly); resume from RUN/checkpoints/latest, or start "
                          "a new run from its weights with recipe.params.init_from where the recipe has it")


def _deepspeed_checkpoint(path: Path) -> tuple[Any, None]:
    """The stored run of a DeepSpeed folder, every file loaded weights-only
    first (DeepSpeed's own loader unpickles; see strategies/deepspeed.py)."""
    from dist_train.strategies.deepspeed import checked_tag_dir, load_checkpoint_file

    from launch.env import detect

    where = f"--resume {path}"
    try:  # CheckpointLoadError is a ConfigError naming the file
        tag_dir = checked_tag_dir(path)
        stored, _ = read_deepspeed_states(load_checkpoint_file(deepspeed_states_file(tag_dir)))
    except FormatError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    _check_client(where, stored)
    # ZeRO writes one optimizer partition per data-parallel rank and cannot re-partition them
    # (DeepSpeed stops deep in its loader with a traceback): say it before anything starts
    saved, world = len(list(tag_dir.glob("zero_pp_rank_*_optim_states.pt"))), detect().world_size
    if saved and saved != world:
        raise ConfigError(f"{where}: a ZeRO checkpoint of {saved} ranks; DeepSpeed cannot re-partition its "
                          f"optimizer state for {world}: resume on {saved} ranks, or `biomtl export` it and "
                          "start a new run from its weights")
    return stored, None


def _fsdp_checkpoint(path: Path) -> tuple[Any, dict[str, tuple[int, ...]]]:
    """The stored run of an FSDP (DCP) folder: its trainer file weights-only,
    the model's global shapes from DCP's index (read with DCP's classes only)."""
    from dist_train.strategies.dcp_files import is_dcp_dir, model_shapes

    where = f"--resume {path}"
    _refuse_lean(where, path)
    if not is_dcp_dir(path):
        raise ConfigError(f"{where}: an FSDP checkpoint is a folder with a DCP index (checkpoints/latest); "
                          f"this is not one (a DDP file? a DeepSpeed folder? then that train.strategy)")
    trainer_file = dcp_trainer_file(path)
    if not trainer_file.is_file():
        raise ConfigError(f"{where}: no regular {trainer_file.name} in the folder (incomplete checkpoint?)")
    stored, _ = _ddp_checkpoint(trainer_file, where)
    return stored, model_shapes(path)  # DCPLoadError is a ConfigError naming the file


def _check_client(where: str, stored: Any) -> None:
    """A resumable checkpoint describes its run (config, data) and its loop position."""
    missing = ("config" if stored.config is None else "data description" if stored.data_info is None
               else None if isinstance((stored.client or {}).get("loop"), Mapping) else "loop")
    if missing:
        raise ConfigError(f"{where}: the checkpoint has no {missing} (written before checkpoints were "
                          f"self-describing, or not by biomtl)")


def _config_or_error(where: str, tree: Mapping[str, Any]) -> Config:
    try:
        return config_from_dict(dict(tree))
    except (ConfigError, KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: the checkpoint's config does not load ({exc})") from None


def _data_info_or_error(where: str, data_info: Mapping[str, Any]) -> Any:
    from recipes.base import DataInfo

    try:
        return DataInfo.from_dict(dict(data_info))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: the checkpoint's data_info is malformed ({exc})") from None


def _current_data_info(cfg: Config, stored: Any) -> Any:
    """The DataInfo this run will train with, read without writing: the shard
    manifest; for synthetic data its cached manifest, or the checkpoint's own
    when the synthetic settings are unchanged (the data is a function of them);
    None when it cannot be known before the data is generated."""
    from shards.manifest import Manifest

    if cfg.data.source == "shards":
        return Manifest.load(cfg.data.shards).data_info()
    cached = _synthetic_cache(cfg)
    if (cached / "manifest.json").is_file():
        return Manifest.load(cached).data_info()
    old = stored.config
    same_data = (old.get("data") or {}).get("source") == "synthetic" and \
        (old.get("data") or {}).get("synthetic") == resolved_config_dict(cfg)["data"]["synthetic"] and \
        (old.get("experiment") or {}).get("seed") == cfg.experiment.seed
    return _data_info_or_error("--resume", stored.data_info) if same_data else None


def _synthetic_cache(cfg: Config) -> Path:
    from shards.synthetic import spec_hash

    return synthetic_cache_dir(cfg) / f"synthetic-{spec_hash(synthetic_spec(cfg))}"


def _model_shapes(cfg: Config, data_info: Any) -> dict[str, tuple[int, ...]] | None:
    """Parameter and buffer shapes of the recipe model, built on the meta
    device (no memory, no weights computed)."""
    import torch

    from dist_train.stored_recipe import build_recipe

    if data_info is None:
        return None
    with torch.device("meta"):  # the shapes only: nothing read to start weights
        model = build_recipe(cfg, data_info, weights_from_checkpoint=True).build_model()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _compare_shapes(where: str, found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                    recipe: str) -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    resized = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or resized):
        return
    parts = []
    if resized:
        k = resized[0]
        parts.append(f"{len(resized)} with another shape (e.g. {k}: {list(found[k])} in the checkpoint, "
                     f"{list(expected[k])} here)")
    if missing:
        parts.append(f"{len(missing)} missing from the checkpoint (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} not in this model (e.g. {unexpected[0]})")
    raise ConfigError(f"{where}: the checkpoint does not fit the {recipe} model this config builds: "
                      f"{'; '.join(parts)}; resume with the run's own recipe.params and data (its config.yaml)")


# ---------------------------------------------------------------------------
# The DeepSpeed config: the user's JSON + what the toolkit config decides.
#
# DeepSpeed key                   comes from
# train_micro_batch_size_per_gpu  data.batch_size (micro-batch per rank)
# gradient_accumulation_steps     train.grad_accum
# train_batch_size                micro-batch x accumulation x world size
# gradient_clipping               train.grad_clip
# bf16.enabled / fp16.enabled     train.precision
# optimizer / scheduler           none: the toolkit's own torch optimizer and LR
#                                 schedule are passed to deepspeed.initialize
#
# A value the JSON sets differently is one ConfigError line, before any process
# group exists; the trainer builds the same dict again with the real world size
# and device precision and hands it to the strategy (StrategyOptions.deepspeed_json).

_PRECISION_SECTIONS = {"bf16": "bf16", "fp16": "fp16"}


def load_user_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"deepspeed.config: cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config {path}: invalid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config {path}: the top level must be a JSON object")
    return data


def _is_set(value: Any) -> bool:
    return value is not None and value != "auto"


def _enabled(section: Any) -> bool:
    if not isinstance(section, Mapping):
        return False
    value = section.get("enabled", False)
    return value is True or (isinstance(value, str) and value.lower() == "true")


def resolved_precision(cfg: Config) -> str:
    """``train.precision`` with ``auto`` resolved for the device the run will
    use (a GPU where one is visible, as ``distributed.pick_device``)."""
    import torch

    from dist_train.precision import resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return resolve_precision(cfg.train.precision, device) if cfg.train.precision == "auto" else cfg.train.precision


def deepspeed_json(cfg: Config, world_size: int, precision: str | None = None) -> dict[str, Any]:
    """The dict given to ``deepspeed.initialize``: the user's JSON with the
    batch, clipping and precision keys written from the toolkit config.
    ``precision``: the resolved one (bf16 | fp16 | fp32); default: from ``cfg``."""
    src = cfg.deepspeed.config
    user = load_user_ds_config(src)
    micro, accum, clip = cfg.data.batch_size, cfg.train.grad_accum, cfg.train.grad_clip
    derived = {
        "train_micro_batch_size_per_gpu": (micro, "data.batch_size"),
        "gradient_accumulation_steps": (accum, "train.grad_accum"),
        "train_batch_size": (micro * accum * world_size,
                             f"data.batch_size x train.grad_accum x world size ({micro}x{accum}x{world_size})"),
    }

    def contradiction(key: str, value: Any, ours: Any, where: str) -> ConfigError:
        return ConfigError(f"deepspeed.config {src}: {key}={value!r} contradicts {where}={ours!r}; the toolkit "
                           f"derives {key} from {where.split(' ')[0]}: remove it from the JSON or make them equal")

    for key, (ours, where) in derived.items():
        value = user.get(key)
        if _is_set(value) and value != ours:
            raise contradiction(key, value, ours, where)
    value = user.get("gradient_clipping")
    if _is_set(value) and not (isinstance(value, (int, float)) and math.isclose(float(value), clip)):
        raise contradiction("gradient_clipping", value, clip, "train.grad_clip")
    precision = precision or resolved_precision(cfg)
    for name, key in (("bf16", "bf16"), ("bf16", "bfloat16"), ("fp16", "fp16")):
        if _enabled(user.get(key)) and precision != name:
            shown = repr(cfg.train.precision) + (f" (= {precision} here)" if cfg.train.precision == "auto" else "")
            raise ConfigError(f"deepspeed.config {src}: {key}.enabled=true contradicts train.precision={shown}; "
                              "the toolkit writes the precision sections from train.precision: remove "
                              f"'enabled' from the JSON or set train.precision={name}")
    if _enabled(user.get("amp")) or _enabled(user.get("torch_autocast")):
        raise ConfigError(f"deepspeed.config {src}: 'amp'/'torch_autocast' are not supported; mixed precision "
                          "comes from train.precision (DeepSpeed's bf16/fp16 sections)")
    for key, toolkit in (("optimizer", "train.optimizer, train.lr, train.betas, train.weight_decay"),
                         ("scheduler", "train.scheduler")):
        if key in user:
            raise ConfigError(f"deepspeed.config {src}: remove the '{key}' section; the toolkit passes its own "
                              f"torch {key} (from {toolkit}) to deepspeed.initialize")
    zero = user.get("zero_optimization", {})
    if not isinstance(zero, Mapping):
        raise ConfigError(f"deepspeed.config {src}: zero_optimization must be a JSON object")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.config {src}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")

    ds = json.loads(json.dumps(user))  # a deep copy
    for key, (ours, _) in derived.items():
        ds[key] = ours
    ds["gradient_clipping"] = clip
    ds.pop("bfloat16", None)  # legacy alias of "bf16"
    for name, key in _PRECISION_SECTIONS.items():
        section = dict(user.get(key) or user.get("bfloat16" if name == "bf16" else key) or {})
        section["enabled"] = precision == name
        ds[key] = section
    ds["zero_optimization"] = dict(zero)
    ds["zero_optimization"]["stage"] = stage
    # The optimizer is the toolkit's torch optimizer (AdamW / SGD): no
    # FusedAdam / DeepSpeedCPUAdam JIT build (~80 s on CPU). ZeRO calls SGD
    # "untested"; with optimizer offload DeepSpeed insists on its CPU Adam
    # unless told otherwise: the torch optimizer then steps the fp32
    # partitions on the CPU.
    ds.setdefault("zero_allow_untested_optimizer", True)
    offload = ds["zero_optimization"].get("offload_optimizer") or {}
    if isinstance(offload, Mapping) and offload.get("device", "none") not in ("none", None):
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    # The toolkit logs every optimizer step itself; DeepSpeed's own progress
    # print is off unless the JSON asks for it.
    ds.setdefault("steps_per_print", 2**31 - 1)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def check_sharded_head(cfg: Config) -> None:
    """A sharded identity head (Partial FC) under DDP, or DeepSpeed ZeRO 1/2 (its rows
    beside the engine: strategies/deepspeed_rows.py). FSDP and ZeRO-3 partition, and
    ZeRO-0 averages, every parameter they are given as if it were replicated, so the
    rank-local centres (dist_train/row_shards.py) would be mixed up across ranks."""
    if getattr(cfg.recipe.resolved, "identity_head_sharding", "none") == "none" or cfg.train.strategy == "ddp":
        return
    key = "recipe.params.identity_head_sharding=partial_fc"
    if cfg.train.strategy != "deepspeed":
        raise ConfigError(f"{key} works with train.strategy=ddp or deepspeed (ZeRO stage 1 or 2); "
                          f"{cfg.train.strategy} does not keep a row-sharded head yet")
    zero = load_user_ds_config(cfg.deepspeed.config).get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, Mapping) else 0
    if stage not in (1, 2):
        raise ConfigError(f"{key} with train.strategy=deepspeed needs ZeRO stage 1 or 2 (deepspeed.config "
                          f"{cfg.deepspeed.config} has stage {stage}: stage 0 averages the rows' gradients, "
                          "stage 3 partitions them as if replicated)")
    if resolved_precision(cfg) == "fp16":
        raise ConfigError(f"train.precision=fp16 with {key} under DeepSpeed: the engine's loss scale would "
                          "reach the head's rows unscaled; use bf16 or fp32, or train.strategy=ddp")


def check_deepspeed_config(cfg: Config, world_size: int | None = None) -> None:
    """Raise a one-line ConfigError where the DeepSpeed JSON contradicts the
    toolkit config, or where this machine cannot run the requested precision.

    Called by :func:`load_checked_config` (before any process group);
    ``world_size`` defaults to the launcher's (torchrun / SLURM / 1)."""
    from dist_train.low_memory_build import zero_stage
    from dist_train.strategies.deepspeed import fp16_supported_here
    from launch.env import detect

    ds = deepspeed_json(cfg, detect().world_size if world_size is None else world_size)
    if cfg.train.low_memory_build == "always" and zero_stage(ds) != 3:
        raise ConfigError(f"train.low_memory_build: 'always' needs ZeRO stage 3 (deepspeed.config {cfg.deepspeed.config} "
                          f"has stage {zero_stage(ds)}: every rank keeps the whole model); use auto or never")
    if resolved_precision(cfg) == "fp16" and not fp16_supported_here():
        raise ConfigError("train.precision: fp16 with train.strategy=deepspeed needs a CUDA GPU; DeepSpeed "
                          "refuses fp16 on this CPU (no oneDNN fp16): use train.precision=bf16 or fp32")
