"""``biomtl launch``: :mod:`launch.cli` with this toolkit's config validation."""
from __future__ import annotations


def run(argv: list[str] | None = None, prog: str = "biomtl launch") -> int:
    from dist_train.preflight import load_checked_config
    from launch import cli

    return cli.run(argv, prog, load_checked_config)
