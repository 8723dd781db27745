"""The sharded identity head (recipe.params.identity_head_sharding=partial_fc) in
whole runs: two torchrun ranks train, save the whole head, resume exactly at the
same world size and re-shard at another; the exported model loads in one
process; bad settings are one line, exit 2, before anything is written."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dist_train.checkpoint import safe_load
from dist_train.config import ConfigError, load_config
from dist_train.main import train
from dist_train.preflight import load_checked_config
from recipes.base import ParallelContext, RecipeDataError, get_recipe
from shards.manifest import DataInfo
from tests.conftest import PYTHON, REPO, tiny_overrides

CONFIG = REPO / "configs" / "facecom.yaml"
SHARDED = dict(recipe__params__identity_head_sharding="partial_fc", recipe__params__sample_rate=0.5,
               train__max_steps=6, train__val_every_steps=3, data__val_split="val")
IDENTITIES = 8  # tiny_overrides' synthetic identities


def _torchrun(tmp_path: Path, *extra: str, **overrides: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dist_train/main.py",
           "--config", str(CONFIG), *extra, *tiny_overrides(tmp_path, **{**SHARDED, **overrides})]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _one_run(tmp_path: Path) -> Path:
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def _latest(run: Path) -> dict:
    return safe_load(run / "checkpoints" / "latest.pt")


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


pytestmark = pytest.mark.integration


def test_two_ranks_train_save_the_whole_head_and_resume_exactly(tmp_path: Path) -> None:
    _torchrun(tmp_path / "full")
    full = _one_run(tmp_path / "full")
    state = _latest(full)
    head = state["model"]["identity_head.weight"]
    assert head.shape[0] == IDENTITIES  # both ranks' rows, in order
    assert int(state["model"]["identity_head.draws"]) == 6  # one sample per training forward
    adam = state["optimizer"]["state"]
    assert any(v["exp_avg"].shape == head.shape for v in adam.values())  # its optimizer state, whole too
    exported = safe_load(full / "model.pt")
    assert torch.equal(exported["model"]["identity_head.weight"], head)

    # stop at step 3, resume on two ranks: the same weights as the uninterrupted run
    _torchrun(tmp_path / "part", train__stop_at_step=3)
    part = _one_run(tmp_path / "part")
    step3 = tmp_path / "part-step3.pt"  # kept for the one-process resume below
    shutil.copy(part / "checkpoints" / "latest.pt", step3)
    _torchrun(tmp_path / "part", "--resume", str(part / "checkpoints" / "latest.pt"))
    _assert_same_weights(_latest(full)["model"], _latest(part)["model"])

    # the step-3 checkpoint of the two-rank run goes on in one process: the head re-shards (a world of one)
    one = tmp_path / "one"
    train(load_config(CONFIG, tiny_overrides(one, **SHARDED)), step3)
    resumed = _latest(_one_run(one))
    assert resumed["client"]["loop"]["step"] == 6
    assert int(resumed["model"]["identity_head.draws"]) == 6
    assert resumed["model"]["identity_head.weight"].shape[0] == IDENTITIES


def test_one_process_run_resumes_on_two_ranks_and_loads_for_inference(tmp_path: Path) -> None:
    from dist_train.inference import InferenceEngine

    one = tmp_path / "one"
    cfg = load_config(CONFIG, tiny_overrides(one, **{**SHARDED, "train__stop_at_step": 3}))
    train(cfg, None)
    run = _one_run(one)
    saved = tmp_path / "one-step3.pt"
    shutil.copy(run / "checkpoints" / "latest.pt", saved)
    _torchrun(tmp_path / "two", "--resume", str(saved))
    two = _one_run(tmp_path / "two")
    state = _latest(two)
    assert state["client"]["loop"]["step"] == 6 and len(state["client"]["rng"]) == 2
    assert state["model"]["identity_head.weight"].shape[0] == IDENTITIES
    engine = InferenceEngine.from_checkpoint(two / "model.pt", device="cpu")
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    emb = engine.embed_tensor(images)
    assert emb.shape[0] == 2 and torch.isfinite(emb).all()
    with torch.no_grad():  # one process holds every centre: the identity logits of a plain head
        logits = engine.model({"image": images})["identity_logits"]
    assert logits.shape == (2, IDENTITIES)


# ---------------------------------------------------------------------- bad input

@pytest.mark.parametrize("override, fragment", [
    ("recipe.params.sample_rate=0", "sample_rate must be in (0, 1]"),
    ("recipe.params.sample_rate=1.5", "sample_rate must be in (0, 1]"),
    ("recipe.params.identity_head=linear", "needs a margin head"),
])
def test_bad_sharding_settings_name_the_key(tmp_path: Path, override: str, fragment: str) -> None:
    overrides = tiny_overrides(tmp_path, recipe__params__identity_head_sharding="partial_fc") + [override]
    with pytest.raises(ConfigError) as info:
        load_checked_config(CONFIG, overrides)
    assert fragment in str(info.value) and "recipe.params" in str(info.value)
    assert not (tmp_path / "runs").exists()


def test_more_ranks_than_identities_is_refused_before_the_model_is_built() -> None:
    cls = get_recipe("facecom")
    params = cls.Params(identity_head_sharding="partial_fc", backbone="resnet18")
    recipe = cls(params, DataInfo(identities=("a", "b", "c"), twin_pairs=(), label_schemas={}, modalities=("rgb",)))
    with pytest.raises(RecipeDataError, match="4 ranks cannot share 3 identities"):
        recipe.use_ranks(ParallelContext(rank=0, world=4))
    recipe.use_ranks(ParallelContext(rank=0, world=3))  # one centre each is enough


def test_a_recipe_without_an_identity_head_has_no_sharding_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="identity_head_sharding"):
        load_config(REPO / "configs" / "thz_mtl.yaml", ["recipe.params.identity_head_sharding=partial_fc"])


def test_cli_says_it_in_one_line_and_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run([PYTHON, "dist_train/main.py", "--config", str(CONFIG), *tiny_overrides(tmp_path),
                           "recipe.params.identity_head_sharding=partial_fc", "recipe.params.sample_rate=-1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "sample_rate" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("recipe", ["photometric_mtl", "ear_teacher"])
def test_photometric_magface_and_ear_pseudo_labels_train_sharded_on_two_ranks(tmp_path: Path, recipe: str) -> None:
    """The other identity heads (MagFace; the ear teacher's pseudo-label head, refilled
    each epoch) on two ranks: the run ends, the checkpoint holds every centre."""
    if recipe == "photometric_mtl":
        from tests.recipes.test_photometric import photometric_overrides as overrides

        config, key = REPO / "configs" / "photometric_mtl.yaml", "identity_head.weight"
    else:
        from tests.recipes.test_ear_teacher import ear_overrides as overrides

        config, key = REPO / "configs" / "ear_teacher.yaml", "head.weight"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dist_train/main.py",
           "--config", str(config), *overrides(tmp_path, recipe__params__identity_head_sharding="partial_fc",
                                               logging__tracking="none")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = _one_run(tmp_path)
    state = _latest(run)
    info = state["client"]["data_info"]
    # the ear teacher's instance labels: one centre per training sample
    expected = len(info["identities"]) if recipe == "photometric_mtl" else info["split_sizes"]["train"]
    assert state["model"][key].shape[0] == expected
    assert "weights identical on all 2 ranks" in proc.stderr + proc.stdout
