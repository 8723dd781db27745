"""``biomtl export --format onnx|torchscript``: the recipe's inference graph (embedding and
task heads), dynamic batch size, the same numbers as the PyTorch model within the bound of
tests/tolerance.py, on real ORL face images (grey PGM); an existing file biomtl did not write
is never replaced."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dist_train.cli import main as biomtl
from tests.conftest import REPO, shared_dataset
from tests.recipes.test_compile_steps import COMMON, RECIPES
from tests.tolerance import module_atol

onnxruntime = pytest.importorskip("onnxruntime", reason="the onnx extra: pip install 'biomtl[onnx]'")


def _model_file(tmp_path: Path, name: str) -> Path:
    from dist_train.config import load_config, recipe_params, resolved_config_dict
    from dist_train.inference import save_exported
    from recipes.base import get_recipe
    from shards.manifest import DataInfo

    config, overrides = RECIPES[name]
    cfg = load_config(REPO / "configs" / config, [f"{k}={v}" for k, v in {**COMMON, **overrides}.items()]
                      + [f"data.synthetic.cache_dir={tmp_path / 'cache'}"])
    info = DataInfo(identities=tuple(f"s{i}" for i in range(6)), twin_pairs=(), label_schemas={},
                    modalities=tuple(cfg.data.synthetic.modalities))
    torch.manual_seed(0)
    model = get_recipe(name)(recipe_params(cfg), info).build_model()
    return save_exported(tmp_path / f"{name}.pt", model.state_dict(), resolved_config_dict(cfg), info.to_dict())


def _reference(model_file: Path, images: list) -> tuple[list[str], torch.Tensor, tuple, float]:
    """(output names, preprocessed batch, PyTorch outputs, tolerance) of the model file."""
    from dist_train.deploy import InferenceGraph
    from dist_train.inference import InferenceEngine

    engine = InferenceEngine.from_checkpoint(model_file, "cpu")
    batch = engine.preprocess(images) if images else None
    if batch is None:
        from dist_train.deploy import example_images

        batch = torch.cat([example_images(engine.recipe, 3), example_images(engine.recipe, 2).flip(-1)])
    graph = InferenceGraph(engine.model.float().eval(), batch)
    with torch.no_grad():
        ref = graph(batch)
        pixels = getattr(engine.model, "pixels", None)
        normalised = pixels(batch) if pixels is not None else batch.float()
    # ONNX Runtime and PyTorch each lie within module_atol of the exact (float64) result
    return graph.output_names, batch, ref, 2 * module_atol(graph, normalised)


def _orl_images(n: int) -> list[Path]:
    orl = shared_dataset("orl_faces")
    return [orl / f"s{1 + i // 2}" / f"{1 + i % 2}.pgm" for i in range(n)]


@pytest.mark.parametrize("name", ["facecom", "dcal_twins"])
def test_onnx_and_torchscript_match_pytorch_on_orl_faces(tmp_path: Path, name: str) -> None:
    model_file = _model_file(tmp_path, name)
    names, batch, ref, atol = _reference(model_file, _orl_images(5))
    assert batch.shape[0] == 5  # not the traced batch of 2: the batch dimension is dynamic
    onnx_file, ts_file = tmp_path / "m.onnx", tmp_path / "m.ts"
    assert biomtl(["export", "--checkpoint", str(model_file), "--format", "onnx", "--output", str(onnx_file)]) == 0
    assert biomtl(["export", "--checkpoint", str(model_file), "--format", "torchscript",
                   "--output", str(ts_file)]) == 0
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == names
    assert names[0] == "embedding" and (name != "facecom" or names == ["embedding", "gender_logits",
                                                                        "identity_logits"])
    got = session.run(None, {"images": batch.numpy()})
    scripted = torch.jit.load(str(ts_file))(batch)
    for key, r, o, s in zip(names, ref, got, scripted):
        assert o.shape == tuple(r.shape), key
        np.testing.assert_allclose(o, r.numpy(), rtol=0, atol=atol, err_msg=key)
        np.testing.assert_allclose(s.detach().numpy(), r.numpy(), rtol=0, atol=atol, err_msg=key)


@pytest.mark.parametrize("name", ["thz_mtl", "ear_teacher"])
def test_onnx_of_the_other_image_recipes_with_their_heads(tmp_path: Path, name: str) -> None:
    model_file = _model_file(tmp_path, name)
    names, batch, ref, atol = _reference(model_file, [])
    out = tmp_path / "m.onnx"
    assert biomtl(["export", "--checkpoint", str(model_file), "--format", "onnx", "--output", str(out)]) == 0
    got = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": batch.numpy()})
    assert "embedding" in names and (name != "thz_mtl" or {"posture_logits", "reconstruction"} <= set(names))
    for key, r, o in zip(names, ref, got):
        np.testing.assert_allclose(o, r.numpy(), rtol=0, atol=atol, err_msg=key)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt"])
def test_export_replaces_only_its_own_files(tmp_path: Path, fmt: str, capsys) -> None:
    model_file = _model_file(tmp_path, "ear_teacher")
    foreign = tmp_path / f"notes.{fmt}"
    foreign.write_text("a user's file\n")
    assert biomtl(["export", "--checkpoint", str(model_file), "--format", fmt, "--output", str(foreign)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not replaced" in err[0] and str(foreign) in err[0]
    assert foreign.read_text() == "a user's file\n"
    own = tmp_path / f"model.{fmt}"
    for _ in range(2):  # the second run replaces what the first wrote
        assert biomtl(["export", "--checkpoint", str(model_file), "--format", fmt, "--output", str(own)]) == 0
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # published by rename, nothing left over


def _photometric_file(tmp_path: Path, name: str, **params: object) -> Path:
    """A photometric model file with attribute heads (the synthetic label schemas)."""
    from dist_train.config import load_config, recipe_params, resolved_config_dict
    from dist_train.inference import save_exported
    from recipes.base import get_recipe
    from shards.manifest import DataInfo
    from shards.synthetic import LABEL_SCHEMAS

    config, overrides = RECIPES[name]
    cfg = load_config(REPO / "configs" / config, [f"{k}={v}" for k, v in {**COMMON, **overrides, **params}.items()])
    info = DataInfo(identities=tuple(f"p{i}" for i in range(6)), twin_pairs=(),
                    label_schemas={k: tuple(v) for k, v in LABEL_SCHEMAS.items()},
                    modalities=("albedo.npy", "depth.npy", "json", "normal.npy", "pgm"))
    torch.manual_seed(0)
    model = get_recipe(name)(recipe_params(cfg), info).build_model()
    return save_exported(tmp_path / f"{name}.pt", model.state_dict(), resolved_config_dict(cfg), info.to_dict())


def _photometric_inputs(recipe, name: str) -> dict[str, torch.Tensor]:
    """A batch of 5 as the evaluation transform makes it: real CMU faces (grey PGM) for
    photometric_mtl on images, the synthetic maps the recipe trains on for photometric_concat."""
    from torch.utils.data import default_collate

    if name == "photometric_mtl":
        from PIL import Image

        cmu = shared_dataset("cmu_faces")
        files = sorted((cmu / "an2i").glob("*.pgm"))[:3] + sorted((cmu / "at33").glob("*.pgm"))[:2]
        samples = [{"pgm": Image.open(f), "json": {}, "__key__": f.stem} for f in files]
    else:
        from shards.synthetic import SyntheticSpec, _sample_fields, render_sample

        spec = SyntheticSpec(num_identities=3, image_size=32, modalities=("maps",))
        samples = [{**_sample_fields(spec, render_sample(spec, i % 3, i)), "__key__": f"s{i}"} for i in range(5)]
    rows = [recipe.transform(s, train=False) for s in samples]
    return {k: v for k, v in default_collate(rows).items() if k in recipe.deploy_inputs()}


@pytest.mark.parametrize("name, params", [("photometric_concat", {}),
                                          ("photometric_mtl", {"recipe.params.modality": "image"})])
def test_onnx_of_the_photometric_recipes_takes_named_maps(tmp_path: Path, name: str, params: dict) -> None:
    """The photometric models read maps, not one image: one named graph input per map,
    dynamic batch (5 rows against a trace of 2), every output within the float32 bound."""
    import json

    import onnx

    from dist_train.deploy import InferenceGraph
    from dist_train.inference import InferenceEngine

    model_file = _photometric_file(tmp_path, name, **params)
    engine = InferenceEngine.from_checkpoint(model_file, "cpu")
    inputs = _photometric_inputs(engine.recipe, name)
    expected_inputs = ["albedo", "normal", "depth"] if name == "photometric_concat" else ["image"]
    assert list(inputs) == expected_inputs and all(v.shape[0] == 5 for v in inputs.values())
    graph = InferenceGraph(engine.model.float().eval(), inputs)
    with torch.no_grad():
        ref = graph(*inputs.values())
    atol = 2 * module_atol(graph, *inputs.values())   # onnxruntime and PyTorch each within the float32 bound
    onnx_file, ts_file = tmp_path / "m.onnx", tmp_path / "m.ts"
    assert biomtl(["export", "--checkpoint", str(model_file), "--format", "onnx", "--output", str(onnx_file)]) == 0
    assert biomtl(["export", "--checkpoint", str(model_file), "--format", "torchscript",
                   "--output", str(ts_file)]) == 0
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == expected_inputs
    assert all(i.shape[0] == "batch" for i in session.get_inputs())
    names = [o.name for o in session.get_outputs()]
    assert names == graph.output_names and {"embedding", "identity_logits", "gender_logits"} <= set(names)
    meta = json.loads(next(p.value for p in onnx.load(str(onnx_file)).metadata_props if p.key == "biomtl"))
    assert list(meta["inputs"]) == expected_inputs and meta["inputs"][expected_inputs[0]]["dtype"] == "float32"
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    scripted = torch.jit.load(str(ts_file))(*inputs.values())
    for key, r, o, s in zip(names, ref, got, scripted):
        assert o.shape == tuple(r.shape), key
        np.testing.assert_allclose(o, r.numpy(), rtol=0, atol=atol, err_msg=key)
        np.testing.assert_allclose(s.detach().numpy(), r.numpy(), rtol=0, atol=atol, err_msg=key)
