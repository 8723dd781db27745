"""Shared fixtures: repo paths, real-data locations, tiny configs."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
PYTHON = sys.executable


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """Commands run in-process (eval, train) configure the root logger; a later test
    that counts stderr lines would then see other libraries' INFO lines (a moto
    server's, botocore's). Each test starts with the root logger as it found it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):  # pytest's own capture handlers come and go with each phase
        if handler not in handlers and type(handler).__module__ != "_pytest.logging":
            root.removeHandler(handler)
    root.setLevel(level)


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real face data not found at {path} (../shared/data is beside the repo in CI)")
    return path


def tiny_overrides(tmp_path: Path, **extra: object) -> list[str]:
    """Overrides that make configs/facecom.yaml a seconds-long CPU run."""
    values = {
        "experiment.output_dir": str(tmp_path / "runs"),
        "data.synthetic.cache_dir": str(tmp_path.parent / "synthetic-cache"),
        "data.synthetic.num_identities": 8,
        "data.synthetic.samples_per_identity": 10,
        "data.synthetic.image_size": 32,
        "data.batch_size": 8,
        "recipe.params.backbone": "resnet18",
        "recipe.params.img_size": 32,
        "train.precision": "fp32",
        "train.epochs": 1,
        "train.log_every_steps": 1,
        "logging.progress": "false",
        "logging.plot": "false",
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def facecom_config() -> Path:
    return REPO / "configs" / "facecom.yaml"


def artifact_context(run_dir: Path, loaders: dict, is_main: bool = True, read_images=None, validation_history=()):
    """What the trainer hands to ``Recipe.write_artifacts``, for calling it directly:
    the trainer's own atomic writer, and a gather over the default process group
    when one is initialised (else this process alone)."""
    import torch.distributed as dist

    from dist_train.checkpoint import atomic_write
    from dist_train.distributed import all_gather_objects
    from recipes.base import ArtifactContext

    def no_images(role, keys):
        raise FileNotFoundError("no shards in this test")

    assert dist.is_available()
    return ArtifactContext(run_dir=Path(run_dir), is_main=is_main, loaders=loaders, gather=all_gather_objects,
                           publish=atomic_write, read_images=read_images or no_images,
                           validation_history=list(validation_history))
