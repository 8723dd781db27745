"""The contract between the trainer and a recipe.

A recipe is data in, losses and metrics out. The trainer only ever talks to a
recipe through this interface, so a new recipe (THz, photometric, ear, ...)
needs no change to the trainer. A recipe knows nothing about distribution:
metric state is gathered across ranks by the trainer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch import nn


@dataclass(frozen=True)
class DataInfo:
    """What a recipe may know about the dataset, read from the shard manifest."""

    identities: tuple[str, ...]
    twin_pairs: tuple[tuple[int, int], ...]
    label_schemas: Mapping[str, tuple[str, ...]]
    modalities: tuple[str, ...]
    split_sizes: Mapping[str, int] = field(default_factory=dict)

    @property
    def num_identities(self) -> int:
        return len(self.identities)


def data_info_dict(info: DataInfo) -> dict[str, Any]:
    """Plain data (for weights_only checkpoints)."""
    return {"identities": list(info.identities), "twin_pairs": [list(p) for p in info.twin_pairs],
            "label_schemas": {k: list(v) for k, v in info.label_schemas.items()},
            "modalities": list(info.modalities), "split_sizes": dict(info.split_sizes)}


def data_info_from_dict(d: Mapping[str, Any]) -> DataInfo:
    return DataInfo(identities=tuple(d["identities"]), twin_pairs=tuple(tuple(p) for p in d["twin_pairs"]),
                    label_schemas={k: tuple(v) for k, v in d["label_schemas"].items()},
                    modalities=tuple(d["modalities"]), split_sizes=dict(d.get("split_sizes", {})))


class Metrics:
    """Accumulates per-rank state during evaluation; the trainer gathers the
    states of all ranks (``all_gather_object``) and calls :meth:`compute` with
    the list, so every rank obtains the same numbers."""

    def update(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def state(self) -> Any:
        """A picklable summary of what this rank saw."""
        raise NotImplementedError

    @staticmethod
    def compute(states: list[Any]) -> dict[str, float]:
        raise NotImplementedError


class Recipe:
    """Base class of all recipes. Subclasses set ``name`` and ``Params``."""

    name: ClassVar[str]
    # A dataclass holding the recipe's own options; the config loader validates
    # ``recipe.params`` from YAML/overrides against it (types, unknown keys).
    Params: ClassVar[type]

    def __init__(self, params: Any, data_info: DataInfo):
        self.params = params
        self.data_info = data_info

    # --- data -------------------------------------------------------------
    def transform(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        """Turn one decoded shard sample into tensors (runs in data workers).

        ``sample`` maps shard extensions to decoded values: ``*.png``/``*.jpg``/
        ``*.pgm`` -> ``PIL.Image``, ``*.npy`` -> ``np.ndarray``, ``json`` -> dict,
        plus ``__key__``. Torch's, NumPy's and Python's global RNGs are seeded
        per sample by the stream before this is called, so random
        augmentations are reproducible and resumable.
        """
        raise NotImplementedError

    # --- model ------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """A module whose ``forward(batch)`` returns a dict with ``loss`` (a
        scalar tensor), ``terms`` (dict of scalar tensors, each loss term) and
        whatever the metrics need. Loss weights that are learned live inside
        this module so every strategy (DDP, DeepSpeed) optimises them."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, base_lr: float) -> list[dict[str, Any]] | None:
        """Optional per-group options (e.g. a smaller LR for a pretrained backbone)."""
        return None

    # --- evaluation ---------------------------------------------------------
    def new_metrics(self) -> Metrics:
        raise NotImplementedError

    def write_artifacts(self, run_dir: Path, model: nn.Module, loaders: Mapping[str, Any],
                        is_main: bool) -> dict[str, float]:
        """Called once after training on every rank (collectives allowed);
        rank 0 (``is_main``) writes recipe-specific pictures and files."""
        return {}


_REGISTRY: dict[str, type[Recipe]] = {}


def register(cls: type[Recipe]) -> type[Recipe]:
    if not dataclasses.is_dataclass(cls.Params):
        raise TypeError(f"{cls.__name__}.Params must be a dataclass")
    _REGISTRY[cls.name] = cls
    return cls


def recipe_names() -> list[str]:
    _import_builtin_recipes()
    return sorted(_REGISTRY)


def get_recipe(name: str) -> type[Recipe]:
    _import_builtin_recipes()
    if name not in _REGISTRY:
        raise KeyError(name)
    return _REGISTRY[name]


def _import_builtin_recipes() -> None:
    import models.recipes  # noqa: F401  (registers the built-in recipes)
