"""``biomtl recipes``: what can be trained. Each registered recipe (:mod:`recipes.base`'s
registry, so a new recipe module shows up by itself) with what it trains, the shipped configs
that use it and its ``recipe.params`` with their defaults and help (the comments in its
``Params`` dataclass, :mod:`recipes.param_docs`).

    biomtl recipes                 # every recipe
    biomtl recipes facecom         # one (or several)
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dist_train.commands import fail

# The configs shipped beside the packages (a source checkout; an installed wheel has none).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def build_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="List the recipes: what each trains, its configs and "
                                 "its recipe.params (defaults, help). Set a param with recipe.params.NAME=VALUE.")
    ap.add_argument("names", nargs="*", metavar="RECIPE", help="only these recipes (default: all)")
    return ap


def configs_by_recipe(config_dir: Path = CONFIG_DIR) -> dict[str, list[str]]:
    """``{recipe name: [config paths relative to the repo]}`` of the YAML files under
    ``config_dir`` (their ``base:`` presets merged, read by the config's own reader)."""
    from dist_train.config import ConfigError, read_config_tree

    found: dict[str, list[str]] = {}
    for path in sorted(config_dir.rglob("*.y*ml")) if config_dir.is_dir() else []:
        try:
            tree = read_config_tree(path)
        except ConfigError:
            continue
        name = (tree.get("recipe") or {}).get("name") if isinstance(tree.get("recipe"), dict) else None
        if isinstance(name, str):
            found.setdefault(name, []).append(path.relative_to(config_dir.parent).as_posix())
    return found


def describe(name: str, configs: list[str]) -> str:
    from recipes.base import get_recipe
    from recipes.param_docs import param_docs, recipe_summary

    cls = get_recipe(name)
    lines = [f"{name}: {recipe_summary(cls)}",
             f"  configs: {', '.join(configs) if configs else '(none shipped)'}",
             "  params (recipe.params.NAME=VALUE):"]
    for doc in param_docs(cls.Params):
        default = "(required)" if doc.default is dataclasses.MISSING else repr(doc.default)
        note = " [start only: not needed by a checkpoint]" if doc.start_only else ""
        lines.append(f"    {doc.name}: {doc.type} = {default}{note}")
        if doc.help:
            lines.append(f"        {doc.help}")
    return "\n".join(lines)


def run(argv: list[str] | None = None, prog: str = "biomtl recipes") -> int:
    from recipes.base import recipe_names

    args = build_parser(prog).parse_args(argv)
    known = recipe_names()
    unknown = [n for n in args.names if n not in known]
    if unknown:
        return fail(f"unknown recipe {unknown[0]!r} (have: {', '.join(known)})")
    configs = configs_by_recipe()
    print("\n\n".join(describe(n, configs.get(n, [])) for n in (args.names or known)))
    return 0
