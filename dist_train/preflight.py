"""Everything checked before a run starts: the config file and overrides
(:func:`dist_train.config.load_config`), then the options only the chosen
strategy and tracker understand, checked by their own modules. A mistake is
one ``ConfigError`` line before any process group, directory or file exists."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from dist_train.config import Config, load_config


def load_checked_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    cfg = load_config(path, list(overrides))
    if cfg.train.strategy == "deepspeed":  # JSON vs toolkit batch/precision settings; fp16 on this device
        from dist_train.strategies.deepspeed import check_toolkit_config

        check_toolkit_config(cfg)
    if cfg.logging.tracking == "mlflow":  # an optional extra
        from dist_train.tracking import require_mlflow

        require_mlflow()
    return cfg
