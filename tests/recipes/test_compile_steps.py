"""Issue 33: the training step of every recipe (forward, losses, what the step computes
for the metrics, backward) compiles to one graph per shape and is not recompiled by
later batches, and it computes what the eager step computes.

Each recipe runs on tiny sizes (32 px, 4-sample batches, the tiny networks of its own
tests) with 5 real batches from its training loader (its batching, its transform).
Dynamo runs with ``fullgraph=True`` (a graph break raises, naming its cause) and
``error_on_recompile`` after the first step. The backend is ``aot_eager``: it traces
forward and backward exactly as inductor does (so graph breaks and recompiles are
the same) but runs the traced aten ops instead of generating C++, which would cost
tens of seconds per recipe on this CPU; one recipe runs through inductor as well.
"""
from __future__ import annotations

import copy
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_train.config import load_config, recipe_params
from dist_train.preflight import synthetic_spec
from dist_train.trainer import LoaderFactory
from recipes.base import get_recipe
from recipes.batch import move_batch
from shards.manifest import Manifest
from shards.synthetic import ensure_synthetic
from tests.conftest import REPO

STEPS = 5
COMMON = {"data.synthetic.image_size": 32, "data.batch_size": 4, "recipe.params.img_size": 32,
          "train.precision": "fp32", "data.synthetic.num_identities": 6, "data.synthetic.samples_per_identity": 6}
THZ = {"recipe.params.width": 4, "recipe.params.depth": 2, "recipe.params.embedding_dim": 16}
# recipe -> (config, overrides); dropout off: the two runs must draw the same random numbers,
# and only ops dynamo leaves as they are (not dropout's fused kernel) guarantee that
RECIPES = {
    "facecom": ("facecom.yaml", {"recipe.params.backbone": "resnet18", "recipe.params.dropout": 0.0,
                                 "recipe.params.metric_loss": "triplet"}),
    "dcal_twins": ("dcal_twins.yaml", {"recipe.params.patch_size": 8, "recipe.params.depth": 2,
                                       "recipe.params.verification_head": "true"}),
    "thz_mtl": ("thz_mtl.yaml", THZ),
    "thz_distill": ("thz_distill.yaml", {**THZ, "recipe.params.fusion_dim": 8, "recipe.params.fusion_heads": 2}),
    "photometric_mtl": ("photometric_mtl.yaml", {"recipe.params.cbam_width": 4, "recipe.params.cbam_blocks": "[1,1]",
                                                 "recipe.params.embedding_dim": 32, "recipe.params.nonid_dim": 8}),
    "photometric_concat": ("photometric_concat.yaml", {"recipe.params.cbam_width": 4,
                                                       "recipe.params.cbam_blocks": "[1,1]",
                                                       "recipe.params.embedding_dim": 32,
                                                       "recipe.params.nonid_dim": 8}),
    "ear_teacher": ("ear_teacher.yaml", {"recipe.params.backbone": "convnext_atto", "recipe.params.dims": "[8,16,32,64]",
                                         "recipe.params.depths": "[1,1,1,1]", "recipe.params.projection_dim": 16,
                                         "recipe.params.projection_hidden": 32, "recipe.params.decoder_width": 16,
                                         "data.synthetic.image_size": 40}),
}


def recipe_and_batches(name: str, cache: Path) -> tuple[object, list[dict]]:
    config, extra = RECIPES[name]
    values = {**COMMON, "experiment.output_dir": str(cache / "runs"), "data.synthetic.cache_dir": str(cache), **extra}
    cfg = load_config(REPO / "configs" / config, [f"{k}={v}" for k, v in values.items()])
    data = ensure_synthetic(Path(cfg.data.synthetic.cache_dir), synthetic_spec(cfg))
    recipe = get_recipe(cfg.recipe.name)(recipe_params(cfg), Manifest.load(data).data_info())
    ctx = types.SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    loaders = LoaderFactory(cfg, ctx, data, recipe)
    batches: list[dict] = []
    epoch = 0
    while len(batches) < STEPS:
        batches += [move_batch(b, ctx.device) for b in loaders.train(epoch)][:STEPS - len(batches)]
        epoch += 1
    return recipe, batches


def build_model(recipe, batches: list[dict]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = recipe.build_model().train()
    if hasattr(model, "set_pseudo_labels"):  # ear_teacher: what on_epoch_start assigns, 3 classes
        keys = np.unique(torch.cat([b["key_hash"] for b in batches]).numpy())
        model.set_pseudo_labels(keys, np.arange(len(keys)) % 3)
    return model


def scalars(out: dict) -> dict[str, torch.Tensor]:
    return {"loss": out["loss"].detach(), **{k: v.detach() for k, v in out["terms"].items()}}


def run_steps(model: torch.nn.Module, step, batches: list[dict]) -> list[dict[str, torch.Tensor]]:
    """Forward, backward and a plain SGD update per batch (SGD: an update proportional to
    the gradient, so a rounding difference stays a rounding difference, as Adam's
    g / sqrt(v) would not for a near-zero gradient). After the first step a recompile raises."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    seen = []
    for i, batch in enumerate(batches):
        torch.manual_seed(100 + i)  # random draws inside the step (PWCA distractors) match
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out = step(batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen.append(scalars(out))
    return seen


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> list[str]:
    return [f"{k}: {float(a[k]):.9g} vs {float(b[k]):.9g}" for k in a
            if not math.isclose(float(a[k]), float(b[k]), rel_tol=tol, abs_tol=tol)]


# Where the two runs differ at all, it is rounding: aot_eager runs decomposed aten ops
# (inductor: fused kernels) whose float32 sums may associate differently, and a compiled
# THz step decodes every expert on all rows (models/thz.py), so its convolutions see other
# batch sizes. Blocked / pairwise float32 sums of N terms differ by up to ~log2(N) eps
# relative; the largest reductions here are BatchNorm statistics over 12 x 32 x 32 values
# (a THz triplet batch), log2 ~ 14. Four more SGD steps at lr 1e-3 carry such a difference
# forward without amplifying it much: x 4. (Measured: at most 3e-7, ~2.5 eps; a skipped
# term or a changed label moves a loss by 1e-3 or more.)
TOL = 4 * 14 * torch.finfo(torch.float32).eps


def compiled_matches_eager(name: str, cache: Path, backend: str) -> None:
    recipe, batches = recipe_and_batches(name, cache)
    eager = build_model(recipe, batches)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    step = torch.compile(compiled, backend=backend, fullgraph=True)  # a graph break raises
    expected = run_steps(eager, eager, batches)
    got = run_steps(compiled, step, batches)
    mismatches = [f"step {i}: {m}" for i, (a, b) in enumerate(zip(got, expected)) for m in close(a, b, TOL)]
    assert not mismatches, mismatches


@pytest.mark.parametrize("name", list(RECIPES))
def test_training_step_is_one_graph_without_recompiles_and_matches_eager(name, tmp_path_factory):
    compiled_matches_eager(name, tmp_path_factory.mktemp(name), "aot_eager")


@pytest.mark.integration  # inductor builds C++ kernels: ~a minute on this CPU
def test_facecom_step_through_inductor_matches_eager(tmp_path_factory):
    compiled_matches_eager("facecom", tmp_path_factory.mktemp("facecom"), "inductor")


def test_new_pseudo_labels_between_epochs_reach_the_compiled_step_without_a_recompile(tmp_path_factory):
    """ear_teacher reassigns its pseudo-label table at every epoch start (outside forward):
    the compiled step uses the new labels and is not recompiled for them."""
    recipe, batches = recipe_and_batches("ear_teacher", tmp_path_factory.mktemp("ear"))
    model = build_model(recipe, batches)
    torch._dynamo.reset()
    step = torch.compile(model, backend="aot_eager", fullgraph=True)
    keys = np.unique(torch.cat([b["key_hash"] for b in batches]).numpy())
    metric = []
    for labels in (np.arange(len(keys)) % 3, np.full(len(keys), -1)):  # next epoch: nothing labelled
        model.set_pseudo_labels(keys, labels)
        with torch._dynamo.config.patch(error_on_recompile=bool(metric)):
            metric.append(float(step(batches[0])["terms"]["metric"]))
    assert metric[0] > 0 and metric[1] == 0.0
