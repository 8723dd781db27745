"""The one builder of a recipe whose weights come from a checkpoint: a run that
resumes, and every command that rebuilds a model from a stored config (export,
inference, eval, verify, extract, predict, demo, the resume checks).

Such a recipe is built with its start-only params off
(:func:`recipes.base.without_start_files`: ``init_from``, ``weights_path``,
``teacher_weights`` empty, ``pretrained`` false): the files they name were read
once, to start the run, and may be gone (a scratch clean-up) without harm; no
hub download is attempted. The stored config keeps their values as a record.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from dist_train.config import Config, ConfigError, config_from_dict, recipe_params, to_dict
from recipes.base import START_ONLY, DataInfo, ParallelContext, Recipe, get_recipe, without_start_files

__all__ = ["StoredRecipe", "StoredRecipeError", "build_recipe", "recipe_from_stored", "stored_params_record"]


class StoredRecipeError(ValueError):
    """A stored config that does not describe a recipe this biomtl can build (one line)."""


def build_recipe(cfg: Config, data_info: DataInfo, weights_from_checkpoint: bool,
                 parallel: ParallelContext | None = None) -> Recipe:
    """The recipe of a live config; ``weights_from_checkpoint``: the run resumes
    (or only shapes are wanted), so nothing is read to start the weights.
    ``parallel``: the training ranks (the trainer's); default a world of one."""
    params = recipe_params(cfg)
    if weights_from_checkpoint:
        params = without_start_files(params)
    recipe = get_recipe(cfg.recipe.name)(params, data_info)
    if parallel is not None:
        recipe.use_ranks(parallel)
    return recipe


@dataclass(frozen=True)
class StoredRecipe:
    cfg: Config
    recipe: Recipe


def recipe_from_stored(config: Mapping[str, Any], data_info: Mapping[str, Any]) -> StoredRecipe:
    """The Config and recipe a checkpoint's or model file's ``config`` and
    ``data_info`` describe (paths there need not exist here)."""
    try:
        cfg = config_from_dict(dict(config))
        info = DataInfo.from_dict(dict(data_info))
        return StoredRecipe(cfg, build_recipe(cfg, info, weights_from_checkpoint=True))
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        raise StoredRecipeError(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}") from None


def stored_params_record(params: Any, stored: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` as plain data for a stored config, the start-only fields as
    ``stored`` recorded them (where the weights first came from), not as the
    rebuild turned them off."""
    record = to_dict(params)
    for f in fields(params):
        if f.metadata.get(START_ONLY) and f.name in stored:
            record[f.name] = stored[f.name]
    return record
