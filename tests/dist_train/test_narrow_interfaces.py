"""Issue 23: the strategies get their own options, not the whole Config (the
DeepSpeed JSON is built and checked in preflight); the three shard loaders share
one base, so the trainer asks them without fallbacks; dead config keys are out."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from dist_train.config import ConfigError, config_from_dict, load_config, resolved_config_dict
from tests.conftest import REPO, tiny_overrides


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "dist_train.config":
            names |= {a.name for a in node.names}
    return names


@pytest.mark.parametrize("module", ["base", "ddp", "deepspeed"])
def test_strategies_do_not_see_the_config(module: str) -> None:
    import importlib
    import inspect

    assert "Config" not in _imported_names(REPO / "dist_train" / "strategies" / f"{module}.py")
    strategy = {"base": "Strategy", "ddp": "DDPStrategy", "deepspeed": "DeepSpeedStrategy"}[module]
    params = inspect.signature(getattr(importlib.import_module(f"dist_train.strategies.{module}"), strategy)).parameters
    assert "cfg" not in params and "grad_clip" not in params


def test_ddp_strategy_takes_its_options() -> None:
    import torch

    from dist_train.precision import Precision
    from dist_train.strategies.base import StrategyOptions
    from dist_train.strategies.ddp import DDPStrategy

    options = StrategyOptions(precision=Precision("fp32", "cpu"), grad_clip=0.5, channels_last=True)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1))
    strategy = DDPStrategy(model, torch.device("cpu"), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                           lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0), options)
    assert strategy.channels_last and strategy.grad_clip == 0.5
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_trainer_builds_the_options_from_the_config(tmp_path: Path) -> None:
    from dist_train.precision import Precision
    from dist_train.trainer import strategy_options

    cfg = load_config(REPO / "configs" / "facecom.yaml", tiny_overrides(
        tmp_path, train__grad_clip=2.0, train__grad_accum=3, train__channels_last="true",
        train__find_unused_parameters="true"))
    options = strategy_options(cfg, Precision("fp32", "cpu"), world_size=2)
    assert (options.grad_clip, options.channels_last, options.compile, options.find_unused_parameters,
            options.world_size) == (2.0, True, False, True, 2)
    assert options.deepspeed_json is None


def test_deepspeed_json_is_built_by_preflight(tmp_path: Path) -> None:
    from dist_train.preflight import deepspeed_json

    cfg = load_config(REPO / "configs" / "facecom.yaml", tiny_overrides(
        tmp_path, train__strategy="deepspeed", deepspeed__config=str(REPO / "configs/deepspeed/zero2.json"),
        train__grad_accum=2, train__grad_clip=1.5))
    ds = deepspeed_json(cfg, world_size=4, precision="fp32")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"]) == (8, 2, 64, 1.5)
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


def test_the_three_loaders_share_one_base() -> None:
    from shards.batching import IndexedTrainLoader
    from shards.reading import ShardLoader
    from shards.stream import EvalLoader, TrainLoader

    for cls in (TrainLoader, EvalLoader, IndexedTrainLoader):
        assert issubclass(cls, ShardLoader), cls
    for name in ("__len__", "__iter__", "num_remaining", "corrupt_count", "corrupt_summary"):
        assert hasattr(ShardLoader, name), name


def test_the_trainer_asks_loaders_without_fallbacks() -> None:
    tree = ast.parse((REPO / "dist_train" / "trainer.py").read_text())
    fallbacks = [ast.unparse(n) for n in ast.walk(tree)
                 if isinstance(n, ast.Call) and getattr(n.func, "id", None) in ("getattr", "hasattr")]
    assert fallbacks == []


def test_checkpoint_save_last_is_gone_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "facecom.yaml", tiny_overrides(tmp_path) + ["checkpoint.save_last=true"])
    line = str(err.value)
    assert "\n" not in line and "checkpoint.save_last" in line and "removed" in line


def test_a_stored_config_with_save_last_still_loads(tmp_path: Path) -> None:
    """Checkpoints and model.pt files of older runs hold it in their config."""
    cfg = load_config(REPO / "configs" / "facecom.yaml", tiny_overrides(tmp_path))
    tree = resolved_config_dict(cfg)
    tree["checkpoint"]["save_last"] = True
    assert config_from_dict(tree).checkpoint == cfg.checkpoint


def test_no_shipped_config_sets_save_last() -> None:
    for path in (REPO / "configs").rglob("*.yaml"):
        assert "save_last" not in (yaml.safe_load(path.read_text()) or {}).get("checkpoint", {}), path
