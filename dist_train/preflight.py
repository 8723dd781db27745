"""Everything checked before a run starts: the config file and overrides
(:func:`dist_train.config.load_config`), the options only the chosen strategy
and tracker understand (checked by their own modules), the weights files the
recipe parameters name, where the run will write, which splits the data has, and a ``--resume`` checkpoint. A mistake is
one ``ConfigError`` line before any process group, directory or file exists."""
from __future__ import annotations

import errno
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from dist_train.config import (NO_SPLIT, Config, ConfigError, DataConfig, config_from_dict, load_config,
                               resolved_config_dict, validates)


def load_checked_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    cfg = load_config(path, list(overrides))
    if cfg.train.strategy == "deepspeed":  # JSON vs toolkit batch/precision settings; fp16 on this device
        from dist_train.strategies.deepspeed import check_toolkit_config

        check_toolkit_config(cfg)
    if cfg.logging.tracking == "mlflow":  # an optional extra
        from dist_train.tracking import require_mlflow

        require_mlflow()
    if cfg.logging.tracking == "wandb":  # an optional extra
        from dist_train.tracking import require_wandb

        require_wandb()
    check_weight_files(cfg)
    if cfg.data.val_bins:
        from dist_train.val_bins import check_val_bins

        check_val_bins(cfg.data.val_bins)
    check_monitored_metrics(cfg)
    check_writable_folder("experiment.output_dir", cfg.experiment.output_dir)
    if cfg.data.source == "synthetic" and not _synthetic_cache(cfg).is_dir():
        check_writable_folder("data.synthetic.cache_dir", cfg.data.synthetic.cache_dir)
    check_splits(cfg)
    return cfg


# ---------------------------------------------------------------------------
# Weights files named by recipe.params

WEIGHT_FIELDS = ("weights_path", "weights")  # name endings: weights_path, lpips_weights, teacher_weights


def check_weight_files(cfg: Config) -> None:
    """Every weights file a recipe parameter names (a path field ending in
    :data:`WEIGHT_FIELDS`) loads weights-only and holds tensors, read by their
    owner :func:`models.backbones.read_state_dict`: a text file, pickled code
    or a file of no tensors is one line here, not a traceback once the run
    directory exists. (``init_from`` is checked by the recipes' own Params.)"""
    import dataclasses

    from dist_train.config import recipe_params
    from models.backbones import WeightsError, read_state_dict

    params = recipe_params(cfg)
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if not (f.metadata.get("path") and value and f.name.endswith(WEIGHT_FIELDS)):
            continue
        try:
            read_state_dict(value)
        except WeightsError as exc:
            raise ConfigError(f"recipe.params.{f.name}: {(str(exc).splitlines() or [''])[0][:300]}") from None


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
            raise ConfigError(f"{where}: a DeepSpeed checkpoint is a folder (checkpoints/latest); this is a file "
                              f"(a DDP checkpoint? then train.strategy=ddp)")
        client, shapes = _deepspeed_checkpoint(path)
    else:
        if path.is_dir():
            raise ConfigError(f"{where}: a folder (a DeepSpeed checkpoint? then train.strategy=deepspeed); "
                              f"train.strategy=ddp resumes from a .pt file")
        client, shapes = _ddp_checkpoint(path)
    old = client["config"]
    old_recipe = (old.get("recipe") or {}).get("name")
    if old_recipe != cfg.recipe.name:
        raise ConfigError(f"{where}: a checkpoint of recipe '{old_recipe}', but recipe.name is "
                          f"'{cfg.recipe.name}'; resume with the run's own config (its config.yaml)")
    old_optimizer = (old.get("train") or {}).get("optimizer")
    if old_optimizer not in (None, cfg.train.optimizer):
        raise ConfigError(f"{where}: the checkpoint's optimizer state is {old_optimizer}, but train.optimizer is "
                          f"{cfg.train.optimizer}; set train.optimizer={old_optimizer}")
    if shapes is None:  # DeepSpeed: the model the checkpoint's own config describes
        shapes = _model_shapes(_config_or_error(where, old), _data_info_or_error(where, client))
    expected = _model_shapes(cfg, data_info if data_info is not None else _current_data_info(cfg, client))
    if expected is not None:
        _compare_shapes(where, shapes, expected, cfg.recipe.name)


def _ddp_checkpoint(path: Path) -> tuple[Mapping[str, Any], dict[str, tuple[int, ...]]]:
    import torch

    from dist_train.strategies.deepspeed import load_problem

    where = f"--resume {path}"
    if not path.is_file():  # a FIFO would block the read
        raise ConfigError(f"{where}: not a regular file")
    try:  # untrusted: weights only; memory-mapped, so every rank reading it costs little
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - an untrusted file: one line naming it and the cause
        problem = load_problem(path, exc)
        if isinstance(exc, OSError) and exc.errno == errno.EINVAL and not zipfile.is_zipfile(path):
            # torch.load reads a cut-off archive as a legacy file and fails with EINVAL
            problem = "truncated or corrupt (not a complete PyTorch zip archive)"
        raise ConfigError(f"{where}: {problem}") from None
    if not isinstance(state, Mapping) or not isinstance(state.get("model"), Mapping):
        raise ConfigError(f"{where}: not a biomtl training checkpoint (no model state)")
    if "optimizer" not in state or not isinstance(state.get("client"), Mapping):
        if "config" in state:
            raise ConfigError(f"{where}: an exported model file (weights only, no optimizer or loop state); "
                              f"resume from RUN/checkpoints/latest.pt")
        raise ConfigError(f"{where}: not a biomtl training checkpoint (no optimizer or loop state)")
    client = state["client"]
    _check_client(where, client)
    return client, {k: tuple(v.shape) for k, v in state["model"].items() if hasattr(v, "shape")}


def _deepspeed_checkpoint(path: Path) -> tuple[Mapping[str, Any], None]:
    """The client state of a DeepSpeed folder, every file loaded weights-only
    first (DeepSpeed's own loader unpickles; see strategies/deepspeed.py)."""
    from dist_train.export import ExportError, model_states_file
    from dist_train.strategies.deepspeed import CLIENT_KEY, checked_tag_dir, load_checkpoint_file

    where = f"--resume {path}"
    try:  # CheckpointLoadError is a ConfigError naming the file
        states = load_checkpoint_file(model_states_file(checked_tag_dir(path)))
    except ExportError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    client = states.get(CLIENT_KEY) if isinstance(states, Mapping) else None
    if not isinstance(client, Mapping):
        raise ConfigError(f"{where}: no biomtl client state in the DeepSpeed checkpoint (not written by biomtl?)")
    _check_client(where, client)
    return client, None


def _check_client(where: str, client: Mapping[str, Any]) -> None:
    for key in ("config", "data_info", "loop"):
        if not isinstance(client.get(key), Mapping):
            raise ConfigError(f"{where}: the checkpoint has no {key} (written before checkpoints were "
                              f"self-describing, or not by biomtl)")


def _config_or_error(where: str, tree: Mapping[str, Any]) -> Config:
    try:
        return config_from_dict(dict(tree))
    except (ConfigError, KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: the checkpoint's config does not load ({exc})") from None


def _data_info_or_error(where: str, client: Mapping[str, Any]) -> Any:
    from recipes.base import DataInfo

    try:
        return DataInfo.from_dict(client["data_info"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: the checkpoint's data_info is malformed ({exc})") from None


def _current_data_info(cfg: Config, client: Mapping[str, Any]) -> Any:
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
    old = client["config"]
    same_data = (old.get("data") or {}).get("source") == "synthetic" and \
        (old.get("data") or {}).get("synthetic") == resolved_config_dict(cfg)["data"]["synthetic"] and \
        (old.get("experiment") or {}).get("seed") == cfg.experiment.seed
    return _data_info_or_error("--resume", client) if same_data else None


def synthetic_spec(cfg: Config) -> Any:
    """The built-in dataset ``data.synthetic`` describes (its cache folder is a hash of it)."""
    from shards.synthetic import SyntheticSpec

    s = cfg.data.synthetic
    return SyntheticSpec(num_identities=s.num_identities, samples_per_identity=s.samples_per_identity,
                         twin_fraction=s.twin_fraction, image_size=s.image_size, split_by=s.split_by,
                         modalities=tuple(s.modalities), seed=cfg.experiment.seed)


def _synthetic_cache(cfg: Config) -> Path:
    from shards.synthetic import spec_hash

    return Path(cfg.data.synthetic.cache_dir) / f"synthetic-{spec_hash(synthetic_spec(cfg))}"


def _model_shapes(cfg: Config, data_info: Any) -> dict[str, tuple[int, ...]] | None:
    """Parameter and buffer shapes of the recipe model, built on the meta
    device (no memory, no weights computed)."""
    import torch

    from dist_train.config import recipe_params
    from recipes.base import get_recipe

    if data_info is None:
        return None
    with torch.device("meta"):
        model = get_recipe(cfg.recipe.name)(recipe_params(cfg), data_info).build_model()
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
